//! The element types the interpreter computes in.

/// A floating-point element type: `f32` or `f64`.
pub trait Real: Copy + PartialOrd + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    const NAME: &'static str;
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn div(self, other: Self) -> Self;
    fn neg(self) -> Self;
    fn powf(self, other: Self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn tanh(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;
    fn zero() -> Self {
        Self::from_f64(0.0)
    }
    fn one() -> Self {
        Self::from_f64(1.0)
    }
}

macro_rules! impl_real {
    ($type:ty, $name:literal) => {
        impl Real for $type {
            const NAME: &'static str = $name;
            #[inline]
            fn from_f64(value: f64) -> Self {
                value as $type
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn add(self, other: Self) -> Self {
                self + other
            }
            #[inline]
            fn sub(self, other: Self) -> Self {
                self - other
            }
            #[inline]
            fn mul(self, other: Self) -> Self {
                self * other
            }
            #[inline]
            fn div(self, other: Self) -> Self {
                self / other
            }
            #[inline]
            fn neg(self) -> Self {
                -self
            }
            #[inline]
            fn powf(self, other: Self) -> Self {
                <$type>::powf(self, other)
            }
            #[inline]
            fn sin(self) -> Self {
                <$type>::sin(self)
            }
            #[inline]
            fn cos(self) -> Self {
                <$type>::cos(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$type>::tanh(self)
            }
            #[inline]
            fn exp(self) -> Self {
                <$type>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$type>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$type>::sqrt(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$type>::abs(self)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$type>::is_finite(self)
            }
        }
    };
}

impl_real!(f32, "f32");
impl_real!(f64, "f64");
