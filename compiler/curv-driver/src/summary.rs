//! The summary `curv check` prints for a file without errors: per train block, every parameter
//! with its shape, rule, structure and optimizer state, and the estimated FLOPs of one step.

use crate::Compilation;
use curv_ir::{CostModel, TrainProgram};
use std::fmt::Write;

pub fn check_summary(compilation: &Compilation) -> String {
    let mut out = String::new();
    let Some(analysis) = &compilation.analysis else {
        return out;
    };
    let program = &analysis.program;
    let warnings = analysis.diagnostics.len();
    let _ = writeln!(
        out,
        "{}: ok ({} train block{}, {} rule{}, {} warning{})",
        compilation.source.display_name,
        program.trains.len(),
        plural(program.trains.len()),
        program.rules.len(),
        plural(program.rules.len()),
        warnings,
        plural(warnings)
    );
    for train in &program.trains {
        out.push('\n');
        train_summary(&mut out, train, &CostModel { rules: &program.rules });
    }
    out
}

fn train_summary(out: &mut String, train: &TrainProgram, cost_model: &CostModel) {
    let data = &train.data;
    let _ = writeln!(
        out,
        "train {}: data `{}` ({} train / {} test examples), batch {}, {} steps, optimizer `{}` (lr {})",
        train.name,
        data.name,
        data.examples - data.test_examples,
        data.test_examples,
        train.batch,
        train.steps,
        train.optimizer.name,
        curv_ir::format_number(train.optimizer.lr)
    );
    let cost = cost_model.step_cost(train);
    let mut rows: Vec<[String; 6]> = vec![[
        "parameter".to_string(),
        "shape".to_string(),
        "elements".to_string(),
        "pattern".to_string(),
        "update".to_string(),
        "state".to_string(),
    ]];
    let mut total_elements = 0i64;
    for (plan, param_cost) in train.optimizer.plans.iter().zip(cost.params.iter()) {
        let param = &train.params[plan.param];
        let elements = param.ty.element_count().unwrap_or(0);
        total_elements += elements;
        let shape: Vec<String> = param.ty.shape.iter().map(|dim| dim.to_string()).collect();
        let mut structure = plan.rule_name.clone();
        if let Some(stats) = curv_ir::option_name(&plan.options, "stats") {
            structure = format!("{structure}({stats})");
        }
        for modifier in &plan.modifiers {
            structure.push_str(&format!(" + {}", modifier.name));
        }
        rows.push([
            param.name.clone(),
            format!("[{}]", shape.join(", ")),
            group_digits(elements as u64),
            plan.pattern.clone(),
            structure,
            bytes(param_cost.state_bytes),
        ]);
    }
    rows.push([
        "total".to_string(),
        String::new(),
        group_digits(total_elements as u64),
        String::new(),
        String::new(),
        bytes(cost.total_state_bytes()),
    ]);
    let widths: Vec<usize> =
        (0..6).map(|column| rows.iter().map(|row| row[column].chars().count()).max().unwrap_or(0)).collect();
    let right_aligned = [false, false, true, false, false, true];
    for (index, row) in rows.iter().enumerate() {
        let mut line = String::from("  ");
        for column in 0..6 {
            let cell = &row[column];
            let padding = widths[column] - cell.chars().count();
            if right_aligned[column] {
                line.push_str(&" ".repeat(padding));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(padding));
            }
            line.push_str("  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if index == 0 || index + 2 == rows.len() {
            let width: usize = widths.iter().sum::<usize>() + 2 * 5;
            let _ = writeln!(out, "  {}", "-".repeat(width));
        }
    }
    let _ = writeln!(out, "  estimated FLOPs per step (batch {}):", train.batch);
    let lines = [
        ("forward", cost.forward_flops),
        ("backward", cost.backward_flops),
        ("curvature statistics", cost.statistics_flops()),
        ("inverse (amortised)", cost.inverse_flops()),
        ("optimizer update", cost.update_flops()),
        ("total", cost.total_flops()),
    ];
    for (label, value) in lines {
        let _ = writeln!(out, "    {label:<22}{:>12}", flops(value));
    }
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

fn group_digits(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, character) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(character);
    }
    out
}

fn bytes(value: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut scaled = value as f64;
    let mut unit = 0;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value} B")
    } else {
        format!("{scaled:.1} {}", UNITS[unit])
    }
}

fn flops(value: f64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut scaled = value;
    let mut unit = 0;
    while scaled >= 1000.0 && unit + 1 < UNITS.len() {
        scaled /= 1000.0;
        unit += 1;
    }
    format!("{scaled:.2} {}FLOP", UNITS[unit])
}
