//! The list of cases, grouped by what an executor claims, and the entry points that run
//! them.

use super::cases::*;
use super::harness::Target;

/// A group of cases; a [`Target`] claims [`Group::Core`] and any of the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// Every executor: success, failures and skips, panics, retries, live events,
    /// cancellation.
    Core,
    /// Resources and concurrency: do `GPU: 1` steps serialize, do independent steps
    /// overlap, is an impossible requirement refused before any step runs. The target
    /// says how its config expresses them ([`Target::with_resources`]).
    Resources,
    /// Executors that run every step in a process of its own: crash containment
    /// (abort, SIGKILL, segfault), captured stdout/stderr and log files, killing what
    /// a step started, refusing `in_memory` storage.
    Isolated,
    /// Steps that ignore SIGTERM end on a second Ctrl-C (`multiprocess`).
    EscalatingCancel,
    /// Steps that ignore SIGTERM are killed after a grace period, on one Ctrl-C (`dask`).
    GraceCancel,
}

/// One case of the suite.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// The case's name, also its function's name in [`cases`](super::cases).
    pub name: &'static str,
    /// The group that claims it.
    pub group: Group,
    /// Runs the case; panics when the executor misbehaves.
    pub run: fn(&Target),
}

const fn case(name: &'static str, group: Group, run: fn(&Target)) -> Case {
    Case { name, group, run }
}

/// Every case, by group.
pub const CASES: &[Case] = &[
    case("success", Group::Core, success),
    case(
        "failure_skips_dependents_and_finishes_independent_branch",
        Group::Core,
        failure_skips_dependents_and_finishes_independent_branch,
    ),
    case(
        "panic_reports_message_and_location",
        Group::Core,
        panic_reports_message_and_location,
    ),
    case(
        "retries_policy_explicit_and_run_config_override",
        Group::Core,
        retries_policy_explicit_and_run_config_override,
    ),
    case(
        "retries_exhausted_fail",
        Group::Core,
        retries_exhausted_fail,
    ),
    case("events_are_live", Group::Core, events_are_live),
    case(
        "cancel_stops_steps_and_leaves_no_orphans",
        Group::Core,
        cancel_stops_steps_and_leaves_no_orphans,
    ),
    case(
        "resources_serialize_steps",
        Group::Resources,
        resources_serialize_steps,
    ),
    case(
        "concurrency_overlaps_independent_steps",
        Group::Resources,
        concurrency_overlaps_independent_steps,
    ),
    case(
        "impossible_resources_rejected_before_the_run",
        Group::Resources,
        impossible_resources_rejected_before_the_run,
    ),
    case(
        "in_memory_storage_is_refused_up_front",
        Group::Isolated,
        in_memory_storage_is_refused_up_front,
    ),
    case("abort_is_contained", Group::Isolated, abort_is_contained),
    case("kill9_is_contained", Group::Isolated, kill9_is_contained),
    case(
        "segfault_is_contained",
        Group::Isolated,
        segfault_is_contained,
    ),
    case(
        "stdout_and_stderr_are_captured",
        Group::Isolated,
        stdout_and_stderr_are_captured,
    ),
    case(
        "grandchildren_are_killed_on_cancel",
        Group::Isolated,
        grandchildren_are_killed_on_cancel,
    ),
    case(
        "second_interrupt_kills_at_once",
        Group::EscalatingCancel,
        second_interrupt_kills_at_once,
    ),
    case(
        "term_ignoring_steps_die_after_one_interrupt",
        Group::GraceCancel,
        term_ignoring_steps_die_after_one_interrupt,
    ),
];

/// The names of the cases of `group`, in order.
pub fn case_names(group: Group) -> Vec<&'static str> {
    CASES
        .iter()
        .filter(|c| c.group == group)
        .map(|c| c.name)
        .collect()
}

/// Runs the case called `name` against `target`; panics if there is no such case, if
/// the target does not claim its group, or when the case fails.
pub fn run_case(target: &Target, name: &str) {
    let case = CASES
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no executor conformance case is called `{name}`"));
    assert!(
        target.groups().contains(&case.group),
        "case `{name}` belongs to {:?}, which the `{}` target does not claim",
        case.group,
        target.executor()
    );
    (case.run)(target);
}

/// Runs every case of every group `target` claims, printing each name as it starts;
/// panics at the first case that fails.
pub fn run_all(target: &Target) {
    for group in target.groups() {
        for case in CASES.iter().filter(|c| c.group == *group) {
            eprintln!(
                "executor conformance: {} ({})",
                case.name,
                target.executor()
            );
            (case.run)(target);
        }
    }
}
