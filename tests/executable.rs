//! The checker's reading of how K-FAC's statistics see a parameter (`curv_ir::executable::
//! layer_uses`, behind E0313) agrees with what the backward pass captures
//! (`curv_ad`'s layer captures, which the runtime's K-FAC reads), on every train block of every
//! example.

use curv_tests::{curv_files, render_file, repository_root};

#[test]
fn the_checked_layer_uses_are_the_captures_of_the_backward_pass() {
    let root = repository_root();
    let mut files = curv_files(&root.join("examples"));
    files.extend(curv_files(&root.join("examples/optimizers")));
    let mut convolutions_seen = 0;
    let mut products_seen = 0;
    for path in files {
        let (compilation, rendered) = render_file(&path, &path.display().to_string());
        let analysis = compilation.analysis.as_ref().unwrap_or_else(|| panic!("{}:\n{rendered}", path.display()));
        for train in &analysis.program.trains {
            let checked = curv_ir::executable::layer_uses(&train.loss, train.params.len());
            let captures = curv_ad::products::gradient_program(&train.loss, &train.params).layer_captures;
            for (index, uses) in checked.iter().enumerate() {
                let of = |convolution: bool| {
                    captures
                        .iter()
                        .filter(|capture| capture.param == index)
                        .filter(|capture| matches!(capture.kind, curv_ad::LayerKind::Conv2d { .. }) == convolution)
                        .count()
                };
                let name = &train.params[index].name;
                assert_eq!((uses.products, uses.convolutions), (of(false), of(true)), "{}: `{name}`", path.display());
                products_seen += uses.products;
                convolutions_seen += uses.convolutions;
            }
        }
    }
    assert!(products_seen > 0 && convolutions_seen > 0, "the examples use products and convolutions");
}
