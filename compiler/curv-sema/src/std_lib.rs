//! The standard library: optimizer presets written in `.curv`, compiled into the binary.

/// `(module path, source)` for every standard-library module, in `use` notation.
pub const MODULES: &[(&str, &str)] = &[
    ("std.optimizers.sgd", include_str!("../std/optimizers/sgd.curv")),
    ("std.optimizers.adam", include_str!("../std/optimizers/adam.curv")),
    ("std.optimizers.adamw", include_str!("../std/optimizers/adamw.curv")),
    ("std.optimizers.adopt", include_str!("../std/optimizers/adopt.curv")),
    ("std.optimizers.adan", include_str!("../std/optimizers/adan.curv")),
    ("std.optimizers.adahessian", include_str!("../std/optimizers/adahessian.curv")),
    ("std.optimizers.sophia", include_str!("../std/optimizers/sophia.curv")),
    ("std.optimizers.shampoo", include_str!("../std/optimizers/shampoo.curv")),
    ("std.optimizers.kfac", include_str!("../std/optimizers/kfac.curv")),
    ("std.optimizers.soap", include_str!("../std/optimizers/soap.curv")),
    ("std.optimizers.muon", include_str!("../std/optimizers/muon.curv")),
    ("std.optimizers.psgd_kron", include_str!("../std/optimizers/psgd_kron.curv")),
    ("std.optimizers.mkor", include_str!("../std/optimizers/mkor.curv")),
    ("std.optimizers.adafisher", include_str!("../std/optimizers/adafisher.curv")),
    ("std.optimizers.shampoo4bit", include_str!("../std/optimizers/shampoo4bit.curv")),
    ("std.optimizers.mfac", include_str!("../std/optimizers/mfac.curv")),
    ("std.optimizers.natural_galore", include_str!("../std/optimizers/natural_galore.curv")),
    ("std.optimizers.psgd_lra", include_str!("../std/optimizers/psgd_lra.curv")),
    ("std.optimizers.fosi", include_str!("../std/optimizers/fosi.curv")),
    ("std.optimizers.lazy_newton", include_str!("../std/optimizers/lazy_newton.curv")),
    ("std.optimizers.singd", include_str!("../std/optimizers/singd.curv")),
    ("std.optimizers.egn", include_str!("../std/optimizers/egn.curv")),
    ("std.optimizers.adalomo", include_str!("../std/optimizers/adalomo.curv")),
    ("std.optimizers.innaprop", include_str!("../std/optimizers/innaprop.curv")),
];

/// The index of a module in [`MODULES`].
pub fn find(path: &str) -> Option<usize> {
    MODULES.iter().position(|(name, _)| *name == path)
}

/// The module that defines `optimizer NAME` (`std.optimizers.sophia` defines `sophia_h` too).
pub fn module_defining_optimizer(name: &str) -> Option<usize> {
    find(&format!("std.optimizers.{name}")).or_else(|| {
        let declaration = format!("optimizer {name} {{");
        MODULES.iter().position(|(_, source)| source.lines().any(|line| line.trim_start() == declaration))
    })
}

/// The file name shown in diagnostics for a standard-library module.
pub fn display_name(index: usize) -> String {
    format!("<{}>", MODULES[index].0)
}

#[cfg(test)]
mod tests {
    struct NoData;

    impl crate::DataProbe for NoData {
        fn probe(&mut self, request: &crate::DataRequest) -> Result<crate::ProbedData, crate::DataProbeError> {
            Err(crate::DataProbeError { path_key: String::new(), not_found: true, message: request.name.clone() })
        }
    }

    #[test]
    fn every_module_parses_and_checks_without_diagnostics() {
        for (name, source) in super::MODULES {
            let parsed = curv_grammar::parse(source);
            assert!(parsed.errors.is_empty(), "{name}: {:?}", parsed.errors);
            let analysis = crate::analyze(&parsed.file, &mut NoData);
            assert!(analysis.diagnostics.is_empty(), "{name}: {:?}", analysis.diagnostics);
        }
    }

    #[test]
    fn every_module_is_importable_by_its_path() {
        for (index, (name, _)) in super::MODULES.iter().enumerate() {
            assert_eq!(super::find(name), Some(index));
            assert!(name.starts_with("std.optimizers."));
        }
    }
}
