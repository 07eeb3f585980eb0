//! Learning-rate schedules.

use curv_ir::{option_number, Schedule};

/// The learning rate at `step` (1-based) of `total` steps.
pub fn learning_rate(base: f64, schedule: Option<&Schedule>, step: u64, total: u64) -> f64 {
    let Some(schedule) = schedule else { return base };
    let number = |key: &str, default: f64| option_number(&schedule.options, key).unwrap_or(default);
    let step = step as f64;
    let total = total.max(1) as f64;
    let warmup = number("warmup", 0.0);
    if warmup > 0.0 && step <= warmup && schedule.kind != "step" && schedule.kind != "constant" {
        return base * step / warmup;
    }
    match schedule.kind.as_str() {
        "cosine" => {
            let minimum = number("min", 0.0);
            let progress = ((step - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
            minimum + (base - minimum) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        "linear" => {
            let minimum = number("min", 0.0);
            let progress = ((step - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
            base + (minimum - base) * progress
        }
        "step" => {
            let every = number("every", 1000.0).max(1.0);
            let gamma = number("gamma", 0.1);
            base * gamma.powf(((step - 1.0) / every).floor())
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::learning_rate;
    use curv_ir::{OptionValue, Schedule};

    fn schedule(kind: &str, options: &[(&str, f64)]) -> Schedule {
        Schedule {
            kind: kind.to_string(),
            options: options.iter().map(|(key, value)| (key.to_string(), OptionValue::Number(*value))).collect(),
        }
    }

    #[test]
    fn schedules_follow_their_definitions() {
        assert_eq!(learning_rate(0.1, None, 7, 10), 0.1);
        let cosine = schedule("cosine", &[("warmup", 10.0), ("min", 0.0)]);
        assert!((learning_rate(1.0, Some(&cosine), 5, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Some(&cosine), 10, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, Some(&cosine), 60, 110) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, Some(&cosine), 110, 110).abs() < 1e-12);
        let step = schedule("step", &[("every", 10.0), ("gamma", 0.5)]);
        assert_eq!(learning_rate(1.0, Some(&step), 10, 100), 1.0);
        assert_eq!(learning_rate(1.0, Some(&step), 11, 100), 0.5);
        let linear = schedule("linear", &[("warmup", 0.0), ("min", 0.0)]);
        assert!((learning_rate(2.0, Some(&linear), 50, 100) - 1.0).abs() < 1e-2);
    }
}
