//! Renders a config schema as annotated YAML: `config-schema` and the web page.

use crate::config::schema::{ConfigType, Field};

/// The schema as YAML-like text: every key with its type, default and description.
pub(crate) fn render(schema: &ConfigType) -> String {
    let mut out = String::from(
        "# Run config accepted by this pipeline. `# one of:` blocks take exactly one key.\n",
    );
    render_type(schema, 0, &mut out);
    out
}

fn render_type(ty: &ConfigType, indent: usize, out: &mut String) {
    match ty {
        ConfigType::Shape { fields } => fields.iter().for_each(|f| render_field(f, indent, out)),
        ConfigType::Selector { fields } => {
            let pad = "  ".repeat(indent);
            let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
            out.push_str(&format!("{pad}# one of: {}\n", names.join(" | ")));
            fields.iter().for_each(|f| render_field(f, indent, out));
        }
        _ => {}
    }
}

fn render_field(f: &Field, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    if !f.description.is_empty() {
        for line in f.description.lines() {
            out.push_str(&format!("{pad}# {line}\n"));
        }
    }
    let required = if f.required { " (required)" } else { "" };
    match &f.ty {
        ConfigType::Shape { fields } if fields.is_empty() => {
            out.push_str(&format!("{pad}{}: {{}}{required}\n", f.name))
        }
        ConfigType::Shape { .. } | ConfigType::Selector { .. } => {
            // A block's default (e.g. config set on an invocation in code) is shown whole.
            let default = match &f.default {
                Some(d)
                    if !d
                        .as_object()
                        .is_some_and(|m| m.len() == 1 && f.name.is_empty()) =>
                {
                    format!("  # default: {d}")
                }
                _ => String::new(),
            };
            out.push_str(&format!("{pad}{}:{required}{default}\n", f.name));
            render_type(&f.ty, indent + 1, out);
        }
        ty => {
            let default = f
                .default
                .as_ref()
                .map(|d| format!(" = {d}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{pad}{}: <{}>{default}{required}\n",
                f.name,
                ty.describe()
            ));
        }
    }
}
