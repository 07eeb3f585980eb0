//! `curv-ad` owns automatic differentiation on curv's typed IR, as program transformations in the
//! style of JAX: [`vjp`] appends a reverse pass (gradients, and the layer inputs and output
//! cotangents of every `x @ W` parameter, from which K-FAC statistics are built without hooks),
//! [`jvp`] appends a forward-mode pass. Their composition gives Hessian-vector products
//! (forward over reverse) and Gauss-Newton-vector products; see [`products`].
//!
//! Both transforms only emit primitive ops of the IR, so their results can be differentiated
//! again, printed (`curv emit --stage grad`), interpreted and lowered like any other function.

mod builder;
mod jvp;
pub mod products;
mod vjp;

pub use builder::Builder;
pub use jvp::{jvp, Jvp};
pub use vjp::{depends_on, vjp, LayerCapture, LayerKind, Seed, Vjp};
