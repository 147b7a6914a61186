//! The build-time checks of dynamic fan-out wiring (see [`super::dynamic`]): a dynamic
//! output is read only item by item (in a map) or whole (collected), a mapped result
//! only in the same map or collected, and fan-outs do not nest.

use super::pipeline::{DefinitionError, InputSource, Invocation, OutputRef, Pipeline};
use super::solid::OutputDefinition;

/// Checks input `input` of `inv`, wired from `source`, whose upstream is output `out`
/// of invocation `upstream`.
#[allow(clippy::result_large_err)]
pub(super) fn wiring(
    pipeline: &Pipeline,
    inv: &Invocation,
    input: &str,
    source: &InputSource,
    upstream: &Invocation,
    out: &OutputDefinition,
) -> Result<(), DefinitionError> {
    let fail = |reason: String| {
        Err(DefinitionError::Dynamic {
            pipeline: pipeline.name().into(),
            solid: inv.alias.clone(),
            reason,
        })
    };
    let here = OutputRef {
        solid: upstream.alias.clone(),
        output: out.name.clone(),
    };
    let name = format!("{}.{}", here.solid, here.output);
    let dynamic = out.dynamic.is_some();
    match source {
        InputSource::Output { .. } | InputSource::FanIn { .. } | InputSource::Config => {
            if dynamic {
                return fail(format!(
                    "input `{input}` reads dynamic output `{name}` as one value; fan out over it with `p.map(&handle, ..)` or gather it with `.collect()`"
                ));
            }
            if let Some(over) = &upstream.mapped_over
                && (inv.mapped_over.as_ref() != Some(over)
                    || matches!(source, InputSource::FanIn { .. }))
            {
                return fail(format!(
                    "input `{input}` reads `{name}`, which has one value per item of `{}.{}`; gather them with `.collect()`",
                    over.solid, over.output
                ));
            }
            Ok(())
        }
        InputSource::Item { .. } => {
            let fits = match &inv.mapped_over {
                Some(over) => {
                    (dynamic && *over == here) || upstream.mapped_over.as_ref() == Some(over)
                }
                None => false,
            };
            if fits {
                Ok(())
            } else {
                fail(format!(
                    "input `{input}` takes one item of `{name}`, but the solid is not invoked in a map over it; invoke it inside `p.map(..)`"
                ))
            }
        }
        InputSource::Collect { .. } => {
            if dynamic || upstream.mapped_over.is_some() {
                Ok(())
            } else {
                fail(format!(
                    "input `{input}` collects `{name}`, which is not a dynamic output nor the result of a map"
                ))
            }
        }
    }
}

/// A mapped invocation cannot fan out again.
#[allow(clippy::result_large_err)]
pub(super) fn outputs(pipeline: &Pipeline, inv: &Invocation) -> Result<(), DefinitionError> {
    match (
        &inv.mapped_over,
        inv.definition.outputs.iter().find(|o| o.dynamic.is_some()),
    ) {
        (Some(over), Some(out)) => Err(DefinitionError::Dynamic {
            pipeline: pipeline.name().into(),
            solid: inv.alias.clone(),
            reason: format!(
                "it runs once per item of `{}.{}` and returns the dynamic output `{}`; nested fan-outs are not supported: collect first, then fan out again",
                over.solid, over.output, out.name
            ),
        }),
        _ => Ok(()),
    }
}
