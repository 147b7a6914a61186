//! Ahead-of-time hand-out, for executors whose cluster orders tasks itself (Dask).
//!
//! A step may be handed out *ahead* while some of its upstreams still run: when each
//! upstream has succeeded or is running now (launched, and not itself ahead: at most
//! one level ahead of what runs). The executor launches it so that the cluster starts
//! it when those upstream attempts end, and only if they all succeeded. Otherwise the
//! launch is *withdrawn*: the step returns to the scheduler as not launched (no attempt
//! consumed, no events), and is skipped or handed out again as without ahead hand-out.
//! The scheduler stays the one that decides: when it sees an upstream attempt fail it
//! withdraws that attempt's ahead dependents itself ([`Scheduler::take_withdrawn`]
//! names them, for the executor to stop), and an ahead step counts as running only
//! once every upstream succeeded here ([`Scheduler::take_promoted`]).
//!
//! Only a running upstream's sole dependent goes ahead of it (a link of a chain, a
//! fan-in): Dask places a task where its dependencies' results are, so the many
//! dependents of a fan-out, launched ahead of their source, would all queue on the one
//! worker that ran it; launched when it is done, they spread over the cluster.
//!
//! Templates of a fan-out are never handed out ahead (their steps are known only once
//! the upstream finished), and a template does not count as started before all its
//! steps succeeded, so what waits for one (the collect) is not handed out ahead of it.

use std::collections::VecDeque;

use super::{Scheduler, State, step_of};

/// The ahead bookkeeping of one run.
pub(super) struct Ahead {
    /// Per step: how many upstreams have not started (are neither running nor done).
    unstarted: Vec<usize>,
    /// Steps that may be handed out ahead (checked again when taken).
    queue: VecDeque<usize>,
    queued: Vec<bool>,
    /// Ahead steps the scheduler withdrew, for the executor to stop.
    withdrawn: Vec<usize>,
    /// Ahead steps whose upstreams all succeeded: running now.
    promoted: Vec<usize>,
}

impl Ahead {
    /// A step added while the run goes: no upstreams.
    pub(super) fn added_step(&mut self) {
        self.unstarted.push(0);
        self.queued.push(false);
    }
}

impl Scheduler<'_> {
    /// Hands out steps ahead of their running upstreams too ([`Scheduler::next_ahead`]).
    /// Used with [`Scheduler::restarts_announced_when_placed`]: an ahead attempt is
    /// announced when it is placed, i.e. once it really runs.
    pub(crate) fn with_ahead(mut self) -> Self {
        let n = self.state.len();
        self.ahead = Some(Ahead {
            unstarted: (0..n).map(|i| self.step(i).upstream.len()).collect(),
            queue: VecDeque::new(),
            queued: vec![false; n],
            withdrawn: Vec::new(),
            promoted: Vec::new(),
        });
        self
    }

    /// `step` entered (`true`) or left the set of started steps: its dependents' counts.
    pub(super) fn upstream_started(&mut self, step: usize, now_started: bool) {
        let downstream = self.downstream_of(step);
        let Some(ahead) = &mut self.ahead else {
            return;
        };
        for &d in downstream {
            if now_started {
                ahead.unstarted[d] -= 1;
                let eligible = ahead.unstarted[d] == 0
                    && self.waiting_on[d] > 0
                    && self.state[d] == State::Waiting
                    && !self.plan.steps[d].is_template();
                if eligible && !ahead.queued[d] {
                    ahead.queued[d] = true;
                    ahead.queue.push_back(d);
                }
            } else {
                ahead.unstarted[d] += 1;
            }
        }
    }

    fn ahead_eligible(&self, step: usize) -> bool {
        let Some(ahead) = &self.ahead else {
            return false;
        };
        self.state[step] == State::Waiting
            && ahead.unstarted[step] == 0
            && self.waiting_on[step] > 0
            && !self.step(step).is_template()
            && self
                .step(step)
                .upstream
                .iter()
                .all(|&u| self.state[u] != State::Running || self.downstream_of(u).len() == 1)
    }

    /// The next step to hand out ahead: its index, attempt number, and the upstreams
    /// running now whose attempts it must wait for. `None` when there is none (or its
    /// resources are busy). Ready steps come first: ask [`Scheduler::next`] before.
    pub(crate) fn next_ahead(&mut self) -> Option<(usize, u32, Vec<usize>)> {
        loop {
            let &front = self.ahead.as_ref()?.queue.front()?;
            if self.ahead_eligible(front) {
                break;
            }
            let ahead = self.ahead.as_mut()?;
            ahead.queue.pop_front();
            ahead.queued[front] = false;
        }
        let queue = &self.ahead.as_ref()?.queue;
        let pos = queue
            .iter()
            .position(|&s| self.ahead_eligible(s) && self.fits(s))?;
        let ahead = self.ahead.as_mut()?;
        let step = ahead.queue.remove(pos).expect("position is valid");
        ahead.queued[step] = false;
        for (name, need) in &step_of(self.plan, &self.added, step).required_resources {
            *self.in_use.entry(name.clone()).or_default() += need;
        }
        self.set_state(step, State::Ahead);
        self.running += 1;
        self.attempts[step] += 1;
        self.origins.remove(&step);
        let after = self
            .step(step)
            .upstream
            .iter()
            .copied()
            .filter(|&u| self.state[u] == State::Running)
            .collect();
        Some((step, self.attempts[step], after))
    }

    /// The last upstream of ahead step `step` succeeded: it runs now.
    pub(super) fn promote(&mut self, step: usize) {
        self.set_state(step, State::Running);
        if let Some(ahead) = &mut self.ahead {
            ahead.promoted.push(step);
        }
    }

    /// Takes back the launch of `step`: not launched after all.
    fn withdraw(&mut self, step: usize) {
        self.release(step);
        self.attempts[step] -= 1;
        self.origins.remove(&step);
        if self.waiting_on[step] == 0 {
            self.set_state(step, State::Ready);
            self.ready.push_front(step);
        } else {
            self.set_state(step, State::Waiting);
        }
        self.withdraw_dependents(step);
    }

    /// The attempt of `step` (launched ahead, or promoted since) did not run, because
    /// an upstream attempt did not succeed where it ran. It goes back to waiting (to
    /// the front of the ready queue if its upstreams did succeed here).
    pub(crate) fn withdrawn(&mut self, step: usize) {
        if matches!(self.state[step], State::Ahead | State::Running) {
            self.withdraw(step);
        }
    }

    /// An attempt of `step` ended without success: its ahead dependents cannot run.
    pub(super) fn withdraw_dependents(&mut self, step: usize) {
        if self.ahead.is_none() {
            return;
        }
        for &d in self.downstream_of(step) {
            if self.state[d] == State::Ahead {
                self.withdraw(d);
                if let Some(ahead) = &mut self.ahead {
                    ahead.withdrawn.push(d);
                }
            }
        }
    }

    /// Cancel: every ahead step goes back to waiting.
    pub(super) fn withdraw_all_ahead(&mut self) {
        if self.ahead.is_none() {
            return;
        }
        for step in 0..self.state.len() {
            if self.state[step] == State::Ahead {
                self.withdraw(step);
            }
        }
        if let Some(ahead) = &mut self.ahead {
            ahead.withdrawn.clear();
            ahead.promoted.clear();
        }
    }

    /// Ahead steps this scheduler withdrew since the last call: the executor stops
    /// their launches and ignores what they report.
    pub(crate) fn take_withdrawn(&mut self) -> Vec<usize> {
        self.ahead
            .as_mut()
            .map(|a| std::mem::take(&mut a.withdrawn))
            .unwrap_or_default()
    }

    /// Ahead steps that run now since the last call (every upstream succeeded): what
    /// they reported so far can be handled.
    pub(crate) fn take_promoted(&mut self) -> Vec<usize> {
        self.ahead
            .as_mut()
            .map(|a| std::mem::take(&mut a.promoted))
            .unwrap_or_default()
    }

    /// Whether `step` was handed out ahead and an upstream has not succeeded yet.
    #[cfg(test)]
    pub(crate) fn is_ahead(&self, step: usize) -> bool {
        self.state[step] == State::Ahead
    }
}
