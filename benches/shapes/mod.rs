//! The pipeline shapes the overhead benchmarks share: a chain and a fan-out of trivial
//! solids (`i64 + 1`), built with the erased builder so their size is a parameter.

use solidflow::definition::pipeline::Pipeline;
use solidflow::definition::solid::{Outputs, SolidDefinition};
use solidflow::definition::types::TypeInfo;

/// Produces `0`.
pub(crate) fn source() -> SolidDefinition {
    SolidDefinition::new("source", |_, _| Ok(Outputs::result(0i64)))
        .output("result", TypeInfo::of::<i64>())
}

/// Adds one to its input `x`.
pub(crate) fn increment() -> SolidDefinition {
    SolidDefinition::new("increment", |_, mut inputs| {
        Ok(Outputs::result(inputs.take::<i64>("x")? + 1))
    })
    .input("x", TypeInfo::of::<i64>())
    .output("result", TypeInfo::of::<i64>())
}

/// `n` steps, each consuming the previous one.
pub(crate) fn chain(n: usize) -> Pipeline {
    Pipeline::build("chain", |p| {
        p.add("s0", source(), vec![]);
        for i in 1..n {
            let up = p.result(&format!("s{}", i - 1));
            p.add(&format!("s{i}"), increment(), vec![("x".into(), up)]);
        }
    })
    .expect("valid chain")
}

/// One source and `n` leaves consuming it.
pub(crate) fn fan_out(n: usize) -> Pipeline {
    Pipeline::build("fan_out", |p| {
        p.add("root", source(), vec![]);
        for i in 0..n {
            let up = p.result("root");
            p.add(&format!("leaf{i}"), increment(), vec![("x".into(), up)]);
        }
    })
    .expect("valid fan-out")
}

/// Sums its `n` inputs `x0`..`x{n-1}`.
#[allow(dead_code)]
pub(crate) fn gather(n: usize) -> SolidDefinition {
    let mut def = SolidDefinition::new("gather", move |_, mut inputs| {
        let mut sum = 0i64;
        for i in 0..n {
            sum += inputs.take::<i64>(&format!("x{i}"))?;
        }
        Ok(Outputs::result(sum))
    })
    .output("result", TypeInfo::of::<i64>());
    for i in 0..n {
        def = def.input(format!("x{i}"), TypeInfo::of::<i64>());
    }
    def
}

/// One source, `n` leaves consuming it, and one step gathering every leaf (`n + 2` steps).
#[allow(dead_code)]
pub(crate) fn fan_in(n: usize) -> Pipeline {
    Pipeline::build("fan_in", |p| {
        p.add("root", source(), vec![]);
        let mut wires = Vec::with_capacity(n);
        for i in 0..n {
            let up = p.result("root");
            p.add(&format!("leaf{i}"), increment(), vec![("x".into(), up)]);
            wires.push((format!("x{i}"), p.result(&format!("leaf{i}"))));
        }
        p.add("gather", gather(n), wires);
    })
    .expect("valid fan-in")
}
