//! Counts the inputs, requested outputs and raw contents of an encoded ModelInferRequest as
//! its bytes arrive, without decoding it.
//!
//! prost decodes a request in full before Keel sees it, and an empty `inputs {}` entry is 2
//! bytes on the wire but a struct of about 200 bytes decoded: a 1.5 MiB request of them
//! made Keel hold 1 GB while four such calls ran. The edge counts first, from the bytes,
//! and refuses a request with more entries than any model may take before the decoder
//! builds them ([`crate::api::deadline`]).
//!
//! The count reads only the top-level tags and lengths, skipping every field's payload, so
//! it costs one step per field whatever the field's size, and never allocates. Bytes that
//! are not a valid message stop the count; the decoder then says what is wrong.

/// `inputs`, `outputs` and `raw_input_contents` of ModelInferRequest.
const INPUTS: u64 = 5;
const OUTPUTS: u64 = 6;
const RAW: u64 = 7;

/// A running count over one message's bytes, fed in pieces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// `inputs` entries so far.
    pub inputs: usize,
    /// `outputs` entries so far.
    pub outputs: usize,
    /// `raw_input_contents` entries so far.
    pub raw: usize,
    state: State,
    /// The varint being read: its value so far and the bits read.
    varint: (u64, u32),
    /// Turns of `feed`'s loop: its work, for the tests that hold it linear in fields.
    steps: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum State {
    /// Reading a tag's varint.
    #[default]
    Tag,
    /// Reading the length varint of a length-delimited field.
    Len,
    /// Reading a varint field's value.
    Varint,
    /// Skipping this many payload bytes.
    Skip(u64),
    /// Not a valid message: counting stopped.
    Invalid,
}

impl Census {
    /// A count for a new message.
    pub fn new() -> Census {
        Census::default()
    }

    /// Takes the next bytes of the message.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            self.steps += 1;
            match self.state {
                State::Invalid => return,
                State::Skip(n) => {
                    let take = n.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = match n - take {
                        0 => State::Tag,
                        rest => State::Skip(rest),
                    };
                }
                State::Tag | State::Len | State::Varint => {
                    let byte = data[0];
                    data = &data[1..];
                    let Some(value) = self.varint_step(byte) else {
                        continue;
                    };
                    self.state = match self.state {
                        State::Tag => self.after_tag(value),
                        State::Len => match value {
                            0 => State::Tag,
                            n => State::Skip(n),
                        },
                        _ => State::Tag,
                    };
                }
            }
        }
    }

    /// Whether the bytes so far end between fields (a whole message, when the message's
    /// length is reached) and were valid.
    pub fn between_fields(&self) -> bool {
        self.state == State::Tag && self.varint.1 == 0
    }
}

impl Census {
    /// One byte of a varint; its value once complete. A varint over 10 bytes is invalid.
    fn varint_step(&mut self, byte: u8) -> Option<u64> {
        let (value, shift) = &mut self.varint;
        if *shift >= 64 {
            self.state = State::Invalid;
            return None;
        }
        *value |= u64::from(byte & 0x7f) << *shift;
        *shift += 7;
        if byte & 0x80 != 0 {
            return None;
        }
        let done = *value;
        self.varint = (0, 0);
        Some(done)
    }

    /// The state after a tag: count the entries that matter, then skip the payload.
    fn after_tag(&mut self, tag: u64) -> State {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 {
            return State::Invalid;
        }
        match wire {
            0 => State::Varint,
            1 => State::Skip(8),
            2 => {
                match field {
                    INPUTS => self.inputs += 1,
                    OUTPUTS => self.outputs += 1,
                    RAW => self.raw += 1,
                    _ => {}
                }
                State::Len
            }
            5 => State::Skip(4),
            // Groups (3, 4) are not in proto3; 6 and 7 are no wire type.
            _ => State::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::pb::inference::ModelInferRequest;
    use crate::pb::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

    fn request(inputs: usize, outputs: usize) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".repeat(300),
            id: "r".into(),
            inputs: (0..inputs)
                .map(|i| InferInputTensor {
                    name: format!("i{i}"),
                    datatype: "FP32".into(),
                    shape: vec![1, 300],
                    ..Default::default()
                })
                .collect(),
            outputs: (0..outputs)
                .map(|i| InferRequestedOutputTensor {
                    name: format!("o{i}"),
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: (0..inputs)
                .map(|_| bytes::Bytes::from(vec![1u8; 1200]))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn counts_what_the_decoder_would_build_in_any_split() {
        let bytes = request(7, 3).encode_to_vec();
        for piece in [1, 2, 3, 7, 64, bytes.len()] {
            let mut c = Census::new();
            for chunk in bytes.chunks(piece) {
                c.feed(chunk);
            }
            assert_eq!((c.inputs, c.outputs, c.raw), (7, 3, 7), "pieces of {piece}");
            assert!(c.between_fields());
        }
        // Empty entries, as the attack sent them.
        let empty = ModelInferRequest {
            inputs: vec![InferInputTensor::default(); 1000],
            ..Default::default()
        };
        let mut c = Census::new();
        c.feed(&empty.encode_to_vec());
        assert_eq!(c.inputs, 1000);
    }

    #[test]
    fn bytes_that_are_no_message_stop_the_count() {
        for bad in [&[0x0b, 0x01][..], &[0x00][..], &[0xff; 12][..]] {
            let mut c = Census::new();
            c.feed(bad);
            c.feed(&request(2, 0).encode_to_vec());
            assert_eq!(c.inputs, 0, "{bad:?}");
            assert!(!c.between_fields());
        }
        // Cut short inside a field.
        let bytes = request(1, 0).encode_to_vec();
        let mut c = Census::new();
        c.feed(&bytes[..bytes.len() - 1]);
        assert!(!c.between_fields());
    }

    #[test]
    fn its_work_is_one_step_per_field_header_byte_not_per_payload_byte() {
        // A field's payload is skipped in one step: a 1 MiB tensor costs what a 1-byte one
        // does. Counted here as the bytes `feed` examines one at a time.
        let big = ModelInferRequest {
            raw_input_contents: vec![bytes::Bytes::from(vec![0u8; 1 << 20])],
            ..Default::default()
        };
        let bytes = big.encode_to_vec();
        let mut c = Census::new();
        c.feed(&bytes);
        assert_eq!(c.raw, 1);
        assert!(c.between_fields());
        // Tag, three length bytes, one skip.
        assert_eq!(c.steps, 5);
        // And 1,000 entries cost a few steps each, whatever their size.
        let mut c = Census::new();
        c.feed(&request(1000, 0).encode_to_vec());
        assert_eq!(c.inputs, 1000);
        assert!(c.steps < 8 * 2000 + 16, "{}", c.steps);
    }
}
