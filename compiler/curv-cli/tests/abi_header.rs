//! The C header `curv build --lib` writes and the symbols it exports list every entry point of
//! the C ABI (`runtime/curv-standalone/src/abi.rs` and its modules in `abi/`), and nothing else.

use std::path::PathBuf;

fn read(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap()
}

/// The names of the `extern "C"` functions of `source`.
fn entry_points(source: &str) -> Vec<String> {
    source
        .lines()
        .filter_map(|line| line.trim().split_once("extern \"C\" fn ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split('(').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_header_and_the_exports_list_every_entry_point_of_the_abi() {
    let mut abi_source = read("runtime/curv-standalone/src/abi.rs");
    let modules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../runtime/curv-standalone/src/abi");
    let mut module_paths: Vec<PathBuf> =
        std::fs::read_dir(modules).unwrap().map(|entry| entry.unwrap().path()).collect();
    module_paths.sort();
    for path in module_paths {
        abi_source.push_str(&std::fs::read_to_string(path).unwrap());
    }
    let abi = entry_points(&abi_source);
    let xla = entry_points(&read("runtime/curv-standalone/src/xla.rs"));
    let main = read("compiler/curv-cli/src/build.rs");
    let header_start = main.find("const LIBRARY_HEADER").unwrap();
    let header_end = header_start + main[header_start..].find("\"#;").unwrap();
    let header = &main[header_start..header_end];
    let exports_start = main.find("const LIBRARY_EXPORTS").unwrap();
    let exports = &main[exports_start..exports_start + main[exports_start..].find("];").unwrap()];
    assert!(abi.contains(&"curv_context_error_code".to_string()), "{abi:?}");
    for name in abi.iter().chain(&xla) {
        assert!(
            header.contains(&format!(" {name}(")) || header.contains(&format!("*{name}(")),
            "`{name}` is not in the header"
        );
        assert!(exports.contains(&format!("\"{name}\"")), "`{name}` is not exported");
    }
    let exported = exports.matches("\"curv_").count();
    assert_eq!(exported, abi.len() + xla.len(), "the exports list a symbol the ABI does not define");
}
