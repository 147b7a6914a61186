//! Where and in which order steps go: a check that some worker offers each step's
//! resources, and critical-path priorities.

use super::bridge::WorkerInfo;
use crate::plan::ExecutionPlan;

/// Fails when some step needs resources that no connected worker offers, naming them.
pub(super) fn unsatisfiable_resources(
    plan: &ExecutionPlan,
    workers: &[WorkerInfo],
) -> Result<(), String> {
    if workers.is_empty() {
        return Ok(());
    }
    let problems: Vec<String> = plan
        .steps
        .iter()
        .filter(|s| !s.required_resources.is_empty())
        .filter(|s| {
            !workers.iter().any(|w| {
                s.required_resources
                    .iter()
                    .all(|(r, need)| w.resources.get(r).copied().unwrap_or(0.0) + 1e-9 >= *need)
            })
        })
        .map(|s| {
            let needs: Vec<String> = s
                .required_resources
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            format!("step `{}` requires {}", s.key, needs.join(", "))
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let offers: Vec<String> = workers
        .iter()
        .map(|w| {
            let r: Vec<String> = w
                .resources
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(
                "{}: {}",
                w.address,
                if r.is_empty() {
                    "no resources".to_string()
                } else {
                    r.join(", ")
                }
            )
        })
        .collect();
    Err(format!(
        "dask executor: {} but no Dask worker offers that (workers offer: {}); start a worker with e.g. \
         `dask worker <scheduler> --resources \"GPU=1\"`, or for a local cluster set \
         `execution: {{dask: {{config: {{resources: {{GPU: 1}}}}}}}}`",
        problems.join("; "),
        offers.join("; ")
    ))
}

/// For each step, the number of steps on the longest path from it to the end of the
/// plan (itself included): the Dask priority when `critical_path_priority` is on.
pub fn critical_path(plan: &ExecutionPlan) -> Vec<i64> {
    fn visit(plan: &ExecutionPlan, step: usize, memo: &mut [Option<i64>]) -> i64 {
        if let Some(v) = memo[step] {
            return v;
        }
        let mut best = 0;
        for &d in &plan.steps[step].downstream {
            best = best.max(visit(plan, d, memo));
        }
        memo[step] = Some(best + 1);
        best + 1
    }
    let mut memo = vec![None; plan.steps.len()];
    (0..plan.steps.len())
        .map(|s| visit(plan, s, &mut memo))
        .collect()
}
