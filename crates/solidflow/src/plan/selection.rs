//! Step selection in Dagster's syntax: which steps of a plan to run.
//!
//! A selection is a comma-separated union of clauses. Each clause names steps by their
//! solid alias (`load`, or the step key `load.compute`), optionally with `*` globs over
//! aliases (`branch_*`), and optionally widens the set upstream and downstream:
//!
//! | clause | selects |
//! |---|---|
//! | `name` | the step |
//! | `*name` | the step and all its ancestors |
//! | `name*` | the step and all its descendants |
//! | `+name`, `++name` | the step and its ancestors up to 1 (2, ...) levels up |
//! | `name+`, `name++` | the step and its descendants up to 1 (2, ...) levels down |
//! | `a,b*` | the union of the clauses |
//!
//! A `*` at the end of a clause is the "all descendants" operator when the text before
//! it names a step; otherwise it is part of a glob (`branch_*`). A leading `*` is always
//! the "all ancestors" operator; a glob may start with it after the operator (`**_raw`).
//! `plan --select` shows what a selection picks.
//!
//! A step of a dynamic fan-out is named with its mapping key, `summarize[part_3]`: the
//! clause picks the fan-out's template, and a re-execution runs only the named items,
//! reading the others from the parent run ([`StepSelection::items`]). The alias alone
//! (`summarize`) picks every item.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use super::ExecutionPlan;

/// How far a clause widens the set in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Not at all.
    None,
    /// Up to this many levels.
    Levels(usize),
    /// All the way.
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Clause {
    up: Reach,
    pattern: String,
    /// A trailing `*`: "all descendants", unless `pattern` names no step, in which case
    /// it belongs to the glob.
    trailing_star: bool,
    down: Reach,
    /// 1-based column of the clause's name in the selection text.
    column: usize,
}

/// A parsed step selection; [`resolve`](Self::resolve) it against a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSelection {
    text: String,
    clauses: Vec<Clause>,
}

/// A selection that cannot be parsed or matches nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step selection `{selection}`, column {column}: {message}")]
pub struct SelectionError {
    /// The whole selection text.
    pub selection: String,
    /// 1-based column (in characters) where the problem is.
    pub column: usize,
    /// What is wrong and what to do.
    pub message: String,
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/' | '*' | '[' | ']')
}

impl StepSelection {
    /// Parses `text`. Every syntax error names its column.
    pub fn parse(text: &str) -> Result<Self, SelectionError> {
        let error = |column: usize, message: String| SelectionError {
            selection: text.to_string(),
            column,
            message,
        };
        let mut clauses = Vec::new();
        let mut start = 0; // char index of the current clause
        let chars: Vec<char> = text.chars().collect();
        if chars.iter().all(|c| c.is_whitespace()) {
            return Err(error(
                1,
                "the selection is empty; name at least one step (e.g. `load*`)".into(),
            ));
        }
        for piece in text.split(',') {
            let len = piece.chars().count();
            let lead = piece.chars().take_while(|c| c.is_whitespace()).count();
            let body: Vec<char> = piece.trim().chars().collect();
            let col = start + lead + 1;
            if body.is_empty() {
                return Err(error(
                    start + 1,
                    "empty clause; remove the extra comma or name a step".into(),
                ));
            }
            let mut i = 0;
            let up = if body[0] == '*' {
                i = 1;
                Reach::All
            } else {
                while i < body.len() && body[i] == '+' {
                    i += 1;
                }
                if i == 0 {
                    Reach::None
                } else {
                    Reach::Levels(i)
                }
            };
            let mut j = body.len();
            while j > i && body[j - 1] == '+' {
                j -= 1;
            }
            let pluses = body.len() - j;
            let trailing_star = pluses == 0 && j > i + 1 && body[j - 1] == '*';
            let down = if pluses > 0 {
                Reach::Levels(pluses)
            } else {
                Reach::None
            };
            let name: String = body[i..j].iter().collect();
            if name.is_empty() {
                return Err(error(
                    col + i,
                    "a clause needs a step name (e.g. `*load` or `load+`)".into(),
                ));
            }
            if let Some((k, c)) = body[i..j]
                .iter()
                .enumerate()
                .find(|(_, c)| !is_name_char(**c))
            {
                let hint = if *c == '+' {
                    "`+` only widens a selection at the start or end of a clause".to_string()
                } else {
                    format!("`{c}` cannot be part of a step name")
                };
                return Err(error(col + i + k, hint));
            }
            if name.chars().all(|c| c == '*') {
                return Err(error(
                    col + i,
                    "a clause needs a step name besides `*` (e.g. `*load` or `load*`)".into(),
                ));
            }
            clauses.push(Clause {
                up,
                pattern: name,
                trailing_star,
                down,
                column: col + i,
            });
            start += len + 1;
        }
        Ok(Self {
            text: text.to_string(),
            clauses,
        })
    }

    /// The items of fan-outs the selection names (`summarize[part_3]`): alias →
    /// mapping keys. A fan-out named by its alias alone is not listed (all its items).
    pub fn items(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut items: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for clause in &self.clauses {
            let pattern = strip_key(clause.pattern.trim_end_matches('*'));
            if let (alias, Some(key)) = split_item(pattern) {
                items
                    .entry(alias.to_string())
                    .or_default()
                    .insert(key.to_string());
            }
        }
        items
    }

    /// The selection as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The steps of `plan` the selection picks, as a flag per step index. A clause that
    /// matches no step is an error naming it (with a "did you mean").
    pub fn resolve(&self, plan: &ExecutionPlan) -> Result<Vec<bool>, SelectionError> {
        let mut selected = vec![false; plan.steps.len()];
        for clause in &self.clauses {
            let mut down = clause.down;
            let mut matches = matching(plan, strip_key(&clause.pattern));
            if clause.trailing_star {
                let without = &clause.pattern[..clause.pattern.len() - 1];
                let as_operator = matching(plan, strip_key(without));
                if as_operator.is_empty() {
                    // `branch_*`: the star belongs to the glob (already matched above).
                } else {
                    matches = as_operator;
                    down = Reach::All;
                }
            }
            if matches.is_empty() {
                return Err(self.unknown(plan, clause));
            }
            for start in matches {
                walk(plan, start, clause.up, true, &mut selected);
                walk(plan, start, down, false, &mut selected);
            }
        }
        Ok(selected)
    }

    fn unknown(&self, plan: &ExecutionPlan, clause: &Clause) -> SelectionError {
        let name = strip_key(clause.pattern.trim_end_matches('*'));
        let aliases = plan.steps.iter().map(|s| s.solid.as_str());
        let hint = crate::config::validate::did_you_mean(name, aliases)
            .map(|m| format!("; did you mean `{m}`?"))
            .unwrap_or_else(|| {
                let all: Vec<&str> = plan
                    .steps
                    .iter()
                    .take(12)
                    .map(|s| s.solid.as_str())
                    .collect();
                let more = if plan.steps.len() > 12 { ", ..." } else { "" };
                format!("; its steps are {}{more}", all.join(", "))
            });
        SelectionError {
            selection: self.text.clone(),
            column: clause.column,
            message: format!(
                "`{}` matches no step of pipeline `{}`{hint}",
                clause.pattern, plan.pipeline
            ),
        }
    }
}

impl fmt::Display for StepSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `load.compute` names the same step as `load`.
fn strip_key(pattern: &str) -> &str {
    pattern.strip_suffix(".compute").unwrap_or(pattern)
}

/// `summarize[part_3]` → (`summarize`, `part_3`); a name without an item → (name, None).
fn split_item(pattern: &str) -> (&str, Option<&str>) {
    pattern
        .strip_suffix(']')
        .and_then(|p| p.split_once('['))
        .map_or((pattern, None), |(alias, key)| (alias, Some(key)))
}

/// Indices of the steps whose alias matches `pattern` (exactly, or as a `*` glob).
fn matching(plan: &ExecutionPlan, pattern: &str) -> Vec<usize> {
    let (pattern, item) = split_item(pattern);
    plan.steps
        .iter()
        .enumerate()
        .filter(|(_, s)| glob_match(pattern, &s.solid))
        .filter(|(_, s)| item.is_none() || s.is_template())
        .map(|(i, _)| i)
        .collect()
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or("");
    for part in parts {
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

/// Marks `start` and the steps up to `reach` levels away from it, upstream when `up`.
fn walk(plan: &ExecutionPlan, start: usize, reach: Reach, up: bool, selected: &mut [bool]) {
    let limit = match reach {
        Reach::None => 0,
        Reach::Levels(n) => n,
        Reach::All => usize::MAX,
    };
    let mut depth = vec![usize::MAX; plan.steps.len()];
    let mut queue = VecDeque::from([start]);
    depth[start] = 0;
    selected[start] = true;
    while let Some(i) = queue.pop_front() {
        if depth[i] == limit {
            continue;
        }
        let next = if up {
            &plan.steps[i].upstream
        } else {
            &plan.steps[i].downstream
        };
        for &n in next {
            if depth[n] == usize::MAX {
                depth[n] = depth[i] + 1;
                selected[n] = true;
                queue.push_back(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigSources, RunConfig};
    use crate::definition::pipeline::Pipeline;
    use crate::definition::solid::{Outputs, SolidDefinition};
    use crate::definition::types::TypeInfo;

    /// `src -> a -> b -> c`, `src -> branch_x -> join`, `src -> branch_y -> join`,
    /// `c -> join`.
    fn plan() -> ExecutionPlan {
        let solid = |name: &str, inputs: &[&str]| {
            let mut def = SolidDefinition::new(name, |_, _| Ok(Outputs::result(1i64)))
                .output("result", TypeInfo::of::<i64>());
            for i in inputs {
                def = def.input(*i, TypeInfo::of::<i64>());
            }
            def
        };
        let pipeline = Pipeline::build("shapes", |p| {
            p.add("src", solid("src", &[]), vec![]);
            for (name, from) in [
                ("a", "src"),
                ("b", "a"),
                ("c", "b"),
                ("branch_x", "src"),
                ("branch_y", "src"),
            ] {
                let r = p.result(from);
                p.add(name, solid(name, &["x"]), vec![("x".into(), r)]);
            }
            let ins = vec![
                ("x".into(), p.result("branch_x")),
                ("y".into(), p.result("branch_y")),
                ("z".into(), p.result("c")),
            ];
            p.add("join", solid("join", &["x", "y", "z"]), ins);
        })
        .unwrap();
        let config = RunConfig::validate(&pipeline, None, &ConfigSources::empty()).unwrap();
        ExecutionPlan::compile(&pipeline, &config)
    }

    fn select(text: &str) -> Vec<String> {
        let plan = plan();
        let flags = StepSelection::parse(text).unwrap().resolve(&plan).unwrap();
        let mut names: Vec<String> = plan
            .steps
            .iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .map(|(s, _)| s.solid.clone())
            .collect();
        names.sort();
        names
    }

    fn error(text: &str) -> SelectionError {
        let plan = plan();
        StepSelection::parse(text)
            .and_then(|s| s.resolve(&plan))
            .unwrap_err()
    }

    #[test]
    fn a_name_or_step_key_selects_one_step() {
        assert_eq!(select("b"), ["b"]);
        assert_eq!(select("b.compute"), ["b"]);
        assert_eq!(select(" b "), ["b"]);
    }

    #[test]
    fn a_leading_star_selects_all_ancestors() {
        assert_eq!(select("*c"), ["a", "b", "c", "src"]);
    }

    #[test]
    fn a_trailing_star_selects_all_descendants() {
        assert_eq!(select("a*"), ["a", "b", "c", "join"]);
        assert_eq!(select("*b*"), ["a", "b", "c", "join", "src"]);
    }

    #[test]
    fn pluses_select_that_many_levels() {
        assert_eq!(select("+c"), ["b", "c"]);
        assert_eq!(select("++c"), ["a", "b", "c"]);
        assert_eq!(select("a+"), ["a", "b"]);
        assert_eq!(select("a++"), ["a", "b", "c"]);
        assert_eq!(select("+b+"), ["a", "b", "c"]);
    }

    #[test]
    fn commas_make_a_union() {
        assert_eq!(select("a,branch_x"), ["a", "branch_x"]);
        assert_eq!(select("c+, +branch_y"), ["branch_y", "c", "join", "src"]);
    }

    #[test]
    fn globs_match_aliases() {
        assert_eq!(select("branch_*"), ["branch_x", "branch_y"]);
        assert!(
            error("*_y").message.contains("`_y` matches no step"),
            "leading * is the ancestors operator"
        );
        assert_eq!(select("**_y"), ["branch_y", "src"], "operator, then a glob");
        assert_eq!(select("br*_x"), ["branch_x"]);
        assert_eq!(select("branch_*+"), ["branch_x", "branch_y", "join"]);
    }

    #[test]
    fn an_unknown_step_is_named_with_its_column_and_a_hint() {
        let e = error("a,bb");
        assert_eq!(e.column, 3);
        assert!(
            e.message
                .contains("`bb` matches no step of pipeline `shapes`; did you mean `b`?"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "step selection `a,bb`, column 3: `bb` matches no step of pipeline `shapes`; did you mean `b`?"
        );
        let e = error("nothing_like_it*");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("its steps are src, a, "), "{e}");
    }

    #[test]
    fn syntax_errors_name_their_column() {
        let cases = [
            ("", 1, "the selection is empty"),
            ("a,,b", 3, "empty clause"),
            ("a, ", 3, "empty clause"),
            ("*", 2, "needs a step name"),
            ("++", 3, "needs a step name"),
            ("a+b", 2, "`+` only widens a selection"),
            ("a,b c", 4, "` ` cannot be part of a step name"),
            ("a,(b)", 3, "`(` cannot be part of a step name"),
            ("x,***", 4, "needs a step name besides `*`"),
        ];
        for (text, column, message) in cases {
            let e = StepSelection::parse(text).unwrap_err();
            assert_eq!(e.column, column, "{text:?}: {e}");
            assert!(e.message.contains(message), "{text:?}: {e}");
        }
    }

    #[test]
    fn glob_matching() {
        assert!(glob_match("a*", "a"));
        assert!(glob_match("a*c", "abc"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("a*a", "a"));
        assert!(!glob_match("abc", "abcd"));
    }
}
