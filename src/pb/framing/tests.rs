use super::*;

/// The first message (or the refusal) of `body` cut into frames at `cuts`.
fn read(body: &[u8], cuts: &[usize], max: usize) -> Result<Bytes, (tonic::Code, String)> {
    first(cut_at(body, cuts), max).map_err(|s| (s.code(), s.message().to_string()))
}

#[test]
fn a_message_in_one_frame_is_taken_without_a_copy() {
    let data = Bytes::from(framed(0, b"hello"));
    let mut m = Messages::new(1024);
    m.push(data.clone()).unwrap();
    let message = m.finish().unwrap();
    assert_eq!(&message[..], b"hello");
    // The same allocation as the frame's bytes.
    assert_eq!(message.as_ptr(), data[PREFIX..].as_ptr());
}

#[test]
fn where_frames_cut_never_changes_what_is_read() {
    // Seeded, so a failure replays: bodies of one or two messages, some cut short, some
    // over the limit, each read whole and cut at random places.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..2_000 {
        let mut body = framed(0, &vec![7u8; next(40)]);
        if next(3) == 0 {
            body.extend(framed(
                if next(8) == 0 { 1 } else { 0 },
                &vec![8u8; next(60)],
            ));
        }
        if next(4) == 0 {
            body.truncate(next(body.len() + 1));
        }
        let whole = read(&body, &[], 48);
        let cuts: Vec<usize> = (0..next(6)).map(|_| next(body.len() + 1)).collect();
        let mut sorted = cuts.clone();
        sorted.sort_unstable();
        assert_eq!(
            read(&body, &sorted, 48),
            whole,
            "{body:?} cut at {sorted:?}"
        );
    }
}

#[test]
fn the_first_of_several_messages_is_the_message() {
    let mut body = framed(0, b"first");
    body.extend(framed(0, b""));
    body.extend(framed(0, b"third"));
    assert_eq!(&read(&body, &[3, 9, 12], 1024).unwrap()[..], b"first");
}
