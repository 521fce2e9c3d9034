//! A transform that implements the `sluice:plugin` world by hand, without the SDK's
//! checks, and returns output the host must refuse, chosen by its config (the config text
//! is the mode): `garbage` (bytes that are not Arrow IPC), `other-schema` (an Arrow batch
//! whose columns are not the declared record schema), `bad-row` (a record error naming a
//! row the batch does not have). Anything else forwards the input unchanged.

#[cfg(target_arch = "wasm32")]
mod guest {
    use std::cell::RefCell;
    use std::sync::Arc;

    use sluice_sdk::__private::bindings::sluice::plugin::types as wit;
    use sluice_sdk::__private::bindings::Guest;
    use sluice_sdk::arrow_array::{ArrayRef, Int64Array, RecordBatch};
    use sluice_sdk::arrow_schema::{DataType, Field, Schema};
    use sluice_sdk::{encode_ipc, record_schema};

    thread_local! {
        static MODE: RefCell<String> = const { RefCell::new(String::new()) };
    }

    struct RawOutput;

    impl Guest for RawOutput {
        fn describe() -> wit::PluginInfo {
            wit::PluginInfo {
                name: "raw-output".into(),
                version: "0.1.0".into(),
                description: "returns broken output on purpose".into(),
                kind: wit::PluginKind::Transform,
                state_version: 0,
                output_schema: encode_ipc(&record_schema(), &[]).unwrap(),
            }
        }
        fn init(config: String) -> Result<Vec<u8>, wit::PluginError> {
            MODE.with_borrow_mut(|m| *m = config.trim().trim_matches('"').to_string());
            Ok(encode_ipc(&record_schema(), &[]).unwrap())
        }
        fn process(batch: Vec<u8>, _context: wit::BatchContext) -> Result<wit::BatchOutput, wit::PluginError> {
            let mode = MODE.with_borrow(|m| m.clone());
            let mut out = wit::BatchOutput { data: batch, record_errors: Vec::new(), watermark_ms: None, late_records: 0 };
            match mode.as_str() {
                "garbage" => out.data = b"this is not Arrow IPC".to_vec(),
                "other-schema" => {
                    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
                    let column: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
                    out.data = encode_ipc(&schema, &[RecordBatch::try_new(schema.clone(), vec![column]).unwrap()]).unwrap();
                }
                "bad-row" => out.record_errors.push(wit::RecordError { row: 1_000_000, reason: "no such row".into() }),
                _ => {}
            }
            Ok(out)
        }
        fn snapshot() -> Result<Vec<u8>, wit::PluginError> {
            Ok(Vec::new())
        }
        fn restore(_state: Vec<u8>, _state_version: u32) -> Result<(), wit::PluginError> {
            Ok(())
        }
    }

    sluice_sdk::__private::bindings::__export_plugin_world!(RawOutput with_types_in sluice_sdk::__private::bindings);
}
