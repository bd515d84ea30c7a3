//! Every error a client can cause or meet gets the right status, a message naming the model,
//! tensor or upstream, rich details, and leaves Keel serving.

mod common;

use common::*;
use keel::pb::inference as pb;
use tonic::Code;
use tonic_types::StatusExt;

async fn infer_err(client: &mut Client, req: pb::ModelInferRequest) -> tonic::Status {
    client
        .model_infer(req)
        .await
        .expect_err("the call must fail")
}

#[tokio::test]
async fn an_unknown_model_is_not_found_by_name() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let mut req = simple_request();
    req.model_name = "resnet".into();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(s.message(), "unknown model 'resnet'");
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "MODEL_NOT_FOUND");
    assert_eq!(info.metadata["model"], "resnet");
    assert!(s.metadata().get("x-request-id").is_some());

    let s = client
        .model_metadata(pb::ModelMetadataRequest {
            name: "resnet".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = client
        .model_config(pb::ModelConfigRequest {
            name: "resnet".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let mut req = simple_request();
    req.model_version = "3".into();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(
        s.message(),
        "model 'simple' has no version '3' (versions: 1)"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_tensors_are_invalid_argument_naming_the_tensor_and_rule() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;

    // Byte length does not match shape × dtype size.
    let mut req = simple_request();
    req.raw_input_contents[0] = vec![0u8; 60].into();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "input 'INPUT0': raw content is 60 bytes but shape [1, 16] of INT32 needs 64 bytes"
    );
    let bad = s.get_details_bad_request().unwrap();
    assert_eq!(bad.field_violations[0].field, "raw_input_contents[0]");

    // Unknown dtype.
    let mut req = simple_request();
    req.inputs[1].datatype = "FLOAT".into();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message()
            .starts_with("input 'INPUT1': unknown datatype \"FLOAT\""),
        "{}",
        s.message()
    );

    // Missing input.
    let mut req = simple_request();
    req.inputs.pop();
    req.raw_input_contents.pop();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(s.message(), "input 'INPUT1' of model 'simple' is missing");

    // Extra input.
    let mut req = simple_request();
    req.inputs.push(input("INPUT2", "INT32", &[1, 16]));
    req.raw_input_contents.push(i32_bytes(&[0; 16]));
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "input 'INPUT2' is not an input of model 'simple' (inputs: INPUT0, INPUT1)"
    );

    // Wrong shape.
    let mut req = simple_request();
    for i in &mut req.inputs {
        i.shape = vec![1, 8];
    }
    req.raw_input_contents = vec![i32_bytes(&[0; 8]), i32_bytes(&[0; 8])];
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    // Every broken rule is reported, each at its field.
    assert_eq!(
        s.message(),
        "2 problems: inputs[0].shape: input 'INPUT0': shape [1, 8] does not match the model's [-1, 16] (-1 is any size); \
         inputs[1].shape: input 'INPUT1': shape [1, 8] does not match the model's [-1, 16] (-1 is any size)"
    );
    assert_eq!(violation_fields(&s), ["inputs[0].shape", "inputs[1].shape"]);

    // Batch too large.
    let mut req = simple_request();
    for i in &mut req.inputs {
        i.shape = vec![9, 16];
    }
    req.raw_input_contents = vec![i32_bytes(&[0; 144]), i32_bytes(&[0; 144])];
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("batch size 9 is outside 1..=8"),
        "{}",
        s.message()
    );

    // Wrong datatype for the model.
    let mut req = simple_request();
    req.inputs[0].datatype = "FP32".into();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "input 'INPUT0': datatype FP32 does not match the model's INT32"
    );

    // Raw entries that do not match the inputs.
    let mut req = simple_request();
    req.raw_input_contents.pop();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "raw_input_contents has 1 entries but the request has 2 inputs"
    );

    // Negative dimension.
    let mut req = simple_request();
    req.inputs[0].shape = vec![-1, 16];
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("negative dimension"),
        "{}",
        s.message()
    );

    // A typed value that does not fit the type.
    let mut i0 = input("INPUT0", "INT8", &[1, 16]);
    i0.contents = Some(pb::InferTensorContents {
        int_contents: vec![300; 16],
        ..Default::default()
    });
    let s = infer_err(
        &mut client,
        pb::ModelInferRequest {
            model_name: "simple_int8".into(),
            inputs: vec![i0],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "input 'INPUT0': element 0 is 300, out of range for INT8"
    );

    // An unknown requested output.
    let mut req = simple_request();
    req.outputs[0].name = "OUTPUT9".into();
    let s = infer_err(&mut client, req).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().starts_with("output 'OUTPUT9' is not an output"),
        "{}",
        s.message()
    );

    // A string that is not a number, for simple_string.
    let mut a: Vec<String> = (0..16).map(|i| i.to_string()).collect();
    a[4] = "four".into();
    let s = infer_err(
        &mut client,
        pb::ModelInferRequest {
            model_name: "simple_string".into(),
            inputs: vec![
                input("INPUT0", "BYTES", &[1, 16]),
                input("INPUT1", "BYTES", &[1, 16]),
            ],
            raw_input_contents: vec![bytes_elements(&a), bytes_elements(&a)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "input 'INPUT0': element 4 is \"four\", not a decimal INT32"
    );

    // And Keel still serves.
    let ok = client
        .model_infer(simple_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i32s(&ok.raw_output_contents[0])[0], 1);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted() {
    let keel = Keel::with_config("[server]\nmax_message_size = \"64KiB\"\n").await;
    let mut client = keel.client().await;
    let big = vec![7u8; 100 * 1024];
    let s = infer_err(
        &mut client,
        pb::ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![input("x", "UINT8", &[big.len() as i64])],
            raw_input_contents: vec![big.into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("server.max_message_size"),
        "{}",
        s.message()
    );
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "REQUEST_TOO_LARGE");
    assert_eq!(info.metadata["class"], "client_error");
    // Just under the limit still works.
    let small = vec![7u8; 60 * 1024];
    let ok = client
        .model_infer(pb::ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![input("x", "UINT8", &[small.len() as i64])],
            raw_input_contents: vec![small.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.raw_output_contents[0].len(), 60 * 1024);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable_naming_it() {
    // Bind and drop a listener to get a loopback port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let keel = Keel::with_config(&format!(
        "[upstreams.triton]\nendpoints = [\"127.0.0.1:{port}\"]\n[models.simple]\nbackend = \"triton\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    let s = infer_err(&mut client, simple_request()).await;
    assert_eq!(s.code(), Code::Unavailable);
    assert!(
        s.message().starts_with("upstream 'triton' is unavailable"),
        "{}",
        s.message()
    );
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert_eq!(info.metadata["upstream"], "triton");
    // ModelReady says why it cannot tell, rather than a bare `false`.
    let r = client
        .model_ready(pb::ModelReadyRequest {
            name: "simple".into(),
            version: String::new(),
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn unsupported_triton_extensions_answer_unimplemented_with_a_reason() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let s = client
        .system_shared_memory_status(pb::SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented);
    assert!(
        s.message().contains("not supported by Keel"),
        "{}",
        s.message()
    );
    let s = client
        .repository_model_load(pb::RepositoryModelLoadRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_answer_over_keels_size_limit_is_resource_exhausted_and_not_held_against_the_upstream() {
    let up = ScriptedUpstream::new(Script {
        padding: 4096,
        ..Script::default()
    });
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&format!(
        "[server]\nmax_message_size = \"1KiB\"\n\
         [defaults.retry]\nmax_attempts = 3\n[defaults.breaker]\nconsecutive_failures = 1\n\
         [upstreams.up]\nendpoints = [\"{addr}\"]\n[models.simple]\nbackend = \"up\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    let s = infer_err(&mut client, simple_request()).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().starts_with(
            "upstream 'up' answered with a message larger than Keel takes (server.max_message_size)"
        ),
        "{s:?}"
    );
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "ANSWER_TOO_LARGE");
    assert_eq!(info.metadata["class"], "local_rejection");
    assert_eq!(info.metadata["upstream"], "up");
    assert_eq!(
        up.seen().len(),
        1,
        "the same answer would come back: no retry"
    );

    // The upstream is healthy: its breaker (open after one failure) did not count it.
    up.script.lock().unwrap().padding = 0;
    client.model_infer(simple_request()).await.unwrap();
    keel.stop().await.unwrap();
}
