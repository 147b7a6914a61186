//! Re-execution start-up: re-executing the last step of a 10,000-step chain must start
//! it in under a second, with no per-step work for the reused steps beyond what the plan
//! needs. The parent runs once (in_process, filesystem storage, run history on disk);
//! then `--select s9999` and `--from-failure` style re-executions are timed from the
//! call to the `STEP_START` of the last step.
//!
//! ```sh
//! cargo bench --bench reexecution
//! ```

#[path = "shapes/mod.rs"]
#[allow(dead_code)] // this benchmark uses only the chain
mod shapes;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use solidflow::execution::reexecution::StepsToRun;
use solidflow::execution::sink::EventListener;
use solidflow::prelude::*;
use solidflow::storage::run_history::RunHistory;

const STEPS: usize = 10_000;

/// Records when the first STEP_START arrives.
#[derive(Default)]
struct FirstStart(Mutex<Option<Instant>>);

impl EventListener for FirstStart {
    fn on_event(&self, event: &Event) {
        if matches!(event.kind, EventKind::StepStart { .. }) {
            self.0.lock().unwrap().get_or_insert_with(Instant::now);
        }
    }
}

fn main() {
    let pipeline = shapes::chain(STEPS);
    let home = tempfile::tempdir().expect("temp dir");
    let history = RunHistory::open(&home.path().join("history.db")).expect("history");
    let options = || RunOptions {
        home: Some(home.path().to_path_buf()),
        history: Some(history.clone()),
        ..RunOptions::default()
    };
    let config = ConfigSources::from_value(serde_json::json!({"storage": {"filesystem": {}}}));
    let t = Instant::now();
    let parent = execute_pipeline_with(&pipeline, &config, options()).expect("parent starts");
    assert!(parent.success());
    println!(
        "parent run: {STEPS} steps in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let last = format!("s{}", STEPS - 1);
    println!(
        "| re-execution of a {STEPS}-step chain | to STEP_START of the last step | whole run |"
    );
    println!("|---|---|---|");
    for round in 0..3 {
        let first = Arc::new(FirstStart::default());
        let t = Instant::now();
        let child = execute_pipeline_with(
            &pipeline,
            &ConfigSources::empty(),
            RunOptions {
                parent_run_id: Some(parent.run_id().to_string()),
                steps: StepsToRun::Selection(last.clone()),
                listeners: vec![first.clone()],
                ..options()
            },
        )
        .expect("re-execution starts");
        let total = t.elapsed();
        assert!(child.success());
        assert_eq!(child.plan().steps.len(), 1);
        assert_eq!(child.result::<i64>(&last).unwrap(), (STEPS - 1) as i64);
        let start = first.0.lock().unwrap().expect("the step started") - t;
        println!(
            "| --select {last} (round {}) | {} | {} |",
            round + 1,
            ms(start),
            ms(total)
        );
        assert!(
            start < Duration::from_secs(1),
            "took {start:?} to start the step"
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}
