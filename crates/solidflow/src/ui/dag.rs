//! The plan's DAG as SVG: steps in columns by topological level, coloured by state.
//!
//! Up to [`FULL_LIMIT`] steps are drawn at once; a larger plan is drawn one page of
//! [`PAGE_STEPS`] steps at a time (in plan order), with a marker on steps whose
//! upstream is on another page, so a 10,000-step run never puts 10,000 nodes and
//! their edges into the browser at once.

use std::collections::HashMap;

use maud::{Markup, html};

use super::run_state::RunState;
use crate::plan::ExecutionPlan;

/// Plans up to this size are drawn whole.
pub(crate) const FULL_LIMIT: usize = 400;
/// Steps per page for larger plans.
pub(crate) const PAGE_STEPS: usize = 250;

const COL: f64 = 200.0;
const ROW: f64 = 30.0;
const NODE_W: f64 = 172.0;
const NODE_H: f64 = 22.0;
const PAD: f64 = 12.0;

/// The page count of a plan of `steps` steps.
pub(crate) fn pages(steps: usize) -> usize {
    if steps <= FULL_LIMIT {
        1
    } else {
        steps.div_ceil(PAGE_STEPS)
    }
}

/// The step range drawn on `page`.
pub(crate) fn window(steps: usize, page: usize) -> std::ops::Range<usize> {
    if steps <= FULL_LIMIT {
        return 0..steps;
    }
    let start = (page * PAGE_STEPS).min(steps.saturating_sub(1) / PAGE_STEPS * PAGE_STEPS);
    start..(start + PAGE_STEPS).min(steps)
}

fn short(key: &str) -> String {
    let name = key.strip_suffix(".compute").unwrap_or(key);
    if name.chars().count() > 24 {
        let head: String = name.chars().take(22).collect();
        format!("{head}…")
    } else {
        name.to_string()
    }
}

/// Draws steps `range` of `plan`, coloured by `state` (or all pending without one).
pub(crate) fn render(
    plan: &ExecutionPlan,
    state: Option<&RunState>,
    range: std::ops::Range<usize>,
) -> Markup {
    let steps = &plan.steps[range.clone()];
    let min_level = steps.iter().map(|s| s.level).min().unwrap_or(0);
    let mut rows_in_level: HashMap<usize, usize> = HashMap::new();
    let mut pos: HashMap<usize, (f64, f64)> = HashMap::new();
    for (offset, step) in steps.iter().enumerate() {
        let col = step.level - min_level;
        let row = rows_in_level.entry(col).or_default();
        pos.insert(
            range.start + offset,
            (PAD + col as f64 * COL, PAD + *row as f64 * ROW),
        );
        *row += 1;
    }
    let cols = rows_in_level.len().max(1);
    let max_rows = rows_in_level.values().copied().max().unwrap_or(1);
    let width = PAD * 2.0 + (cols as f64 - 1.0) * COL + NODE_W;
    let height = PAD * 2.0 + (max_rows as f64 - 1.0) * ROW + NODE_H;
    html! {
        svg class="dag" xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox=(format!("0 0 {width} {height}")) role="img" aria-label="execution plan" {
            g class="edges" {
                @for (offset, step) in steps.iter().enumerate() {
                    @let (x, y) = pos[&(range.start + offset)];
                    @for up in &step.upstream {
                        @if let Some((ux, uy)) = pos.get(up) {
                            @let (x1, y1, x2, y2) = (ux + NODE_W, uy + NODE_H / 2.0, x, y + NODE_H / 2.0);
                            path d=(format!("M{x1},{y1} C{},{y1} {},{y2} {x2},{y2}", x1 + 40.0, x2 - 40.0)) {}
                        }
                    }
                }
            }
            @for (offset, step) in steps.iter().enumerate() {
                @let (x, y) = pos[&(range.start + offset)];
                @let st = state.map_or("pending", |s| s.state_of(&step.key).as_str());
                @let outside = step.upstream.iter().filter(|u| !pos.contains_key(u)).count();
                g class={"step " (st)} data-step=(step.key) tabindex="0" transform=(format!("translate({x},{y})")) {
                    title { (step.key) " — " (st) @if outside > 0 { " (" (outside) " upstream step(s) on other pages)" } }
                    rect width=(NODE_W) height=(NODE_H) rx="4" {}
                    @if outside > 0 { circle class="offpage" cx="0" cy=(NODE_H / 2.0) r="4" {} }
                    text x="8" y="15" { (short(&step.key)) }
                }
            }
        }
    }
}
