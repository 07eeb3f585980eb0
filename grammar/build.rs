fn main() {
    lalrpop::Configuration::new().use_cargo_dir_conventions().process().expect("the curv grammar is valid");
    println!("cargo:rerun-if-changed=src/curv.lalrpop");
}
