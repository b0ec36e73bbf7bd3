//! Policy documents, as a directory or the API server hands them over: the
//! parser, its checks, and the compiler behind them never panic, whatever
//! the bytes; what they accept compiles, or is refused with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_policy::{MeshSettings, compile, parse_str};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = parse_str("fuzz.yaml", text) else {
        return;
    };
    let settings = MeshSettings {
        node: "node-a".into(),
        ..MeshSettings::default()
    };
    let _ = compile(&docs, &settings);
});
