//! Config schemas: the shape of every config block, with defaults and docs.
//!
//! A schema is data, so one validator reports every problem at once with its path, and
//! `config-schema` can print what is accepted.

use serde::Serialize;
use serde_json::Value;

/// The type of one config value.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConfigType {
    /// Anything at all (passed through unchecked).
    Any,
    /// `true` or `false`.
    Bool,
    /// A whole number, within its range.
    Int {
        /// The smallest accepted value.
        #[serde(skip_serializing_if = "Option::is_none")]
        minimum: Option<f64>,
        /// The largest accepted value.
        #[serde(skip_serializing_if = "Option::is_none")]
        maximum: Option<f64>,
    },
    /// A finite number (whole numbers are accepted too), within its range.
    Float {
        /// The smallest accepted value.
        #[serde(skip_serializing_if = "Option::is_none")]
        minimum: Option<f64>,
        /// The largest accepted value.
        #[serde(skip_serializing_if = "Option::is_none")]
        maximum: Option<f64>,
    },
    /// A string, at least `min_length` characters long.
    String {
        /// The fewest characters accepted.
        #[serde(skip_serializing_if = "Option::is_none")]
        min_length: Option<u64>,
    },
    /// One of a fixed set of strings.
    Enum {
        /// The accepted values.
        values: Vec<String>,
    },
    /// A list whose items all have one type.
    List {
        /// Item type.
        item: Box<ConfigType>,
    },
    /// A map from free-form names to values of one type (e.g. `resources: {GPU: 1}`).
    Map {
        /// Value type.
        value: Box<ConfigType>,
    },
    /// A map with fixed, documented keys.
    Shape {
        /// The accepted keys.
        fields: Vec<Field>,
    },
    /// A map with exactly one of the listed keys (e.g. `storage: {filesystem: {}}`).
    Selector {
        /// The choices.
        fields: Vec<Field>,
    },
}

/// One key of a [`ConfigType::Shape`] or [`ConfigType::Selector`].
#[derive(Debug, Clone, Serialize)]
pub struct Field {
    /// The key.
    pub name: String,
    /// The value's type.
    #[serde(flatten)]
    pub ty: ConfigType,
    /// Whether the key must be present.
    pub required: bool,
    /// The value used when the key is absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// What the key means, shown by `config-schema`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl Field {
    /// A key that must be given.
    pub fn required(name: impl Into<String>, ty: ConfigType) -> Self {
        Self {
            name: name.into(),
            ty,
            required: true,
            default: None,
            description: String::new(),
        }
    }

    /// A key that may be left out.
    pub fn optional(name: impl Into<String>, ty: ConfigType) -> Self {
        Self {
            name: name.into(),
            ty,
            required: false,
            default: None,
            description: String::new(),
        }
    }

    /// Sets the value used when the key is absent (makes it optional).
    pub fn default(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self.required = false;
        self
    }

    /// Sets the description shown by `config-schema`.
    pub fn doc(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }
}

impl ConfigType {
    /// Any whole number.
    pub const INT: Self = Self::Int {
        minimum: None,
        maximum: None,
    };
    /// Any finite number.
    pub const FLOAT: Self = Self::Float {
        minimum: None,
        maximum: None,
    };
    /// Any string.
    pub const STRING: Self = Self::String { min_length: None };

    /// A shape with the given fields.
    pub fn shape(fields: impl IntoIterator<Item = Field>) -> Self {
        Self::Shape {
            fields: fields.into_iter().collect(),
        }
    }

    /// A selector over the given choices.
    pub fn selector(fields: impl IntoIterator<Item = Field>) -> Self {
        Self::Selector {
            fields: fields.into_iter().collect(),
        }
    }

    /// A list of `item`.
    pub fn list(item: ConfigType) -> Self {
        Self::List {
            item: Box::new(item),
        }
    }

    /// A free-form map to `value`.
    pub fn map(value: ConfigType) -> Self {
        Self::Map {
            value: Box::new(value),
        }
    }

    /// An enum of strings.
    pub fn one_of<S: Into<String>>(values: impl IntoIterator<Item = S>) -> Self {
        Self::Enum {
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// The empty shape `{}`, for blocks without options.
    pub fn empty() -> Self {
        Self::Shape { fields: Vec::new() }
    }

    /// The standard `{config: {...}}` wrapper used by executors and storages.
    /// `config` is optional when none of its fields is required.
    pub fn config_block(config: ConfigType) -> Self {
        let required = config.has_required_fields();
        let field = Field {
            name: "config".into(),
            ty: config,
            required,
            default: None,
            description: String::new(),
        };
        Self::shape([field])
    }

    /// Whether a value of this type must contain some key.
    pub fn has_required_fields(&self) -> bool {
        match self {
            Self::Shape { fields } => fields.iter().any(|f| f.required),
            Self::Selector { .. } => true,
            _ => false,
        }
    }

    /// A short human name for error messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Any => "any value".into(),
            Self::Bool => "a boolean".into(),
            Self::Int { minimum, maximum } => format!("an integer{}", range(*minimum, *maximum)),
            Self::Float { minimum, maximum } => format!("a number{}", range(*minimum, *maximum)),
            Self::String {
                min_length: None | Some(0),
            } => "a string".into(),
            Self::String {
                min_length: Some(1),
            } => "a non-empty string".into(),
            Self::String {
                min_length: Some(n),
            } => format!("a string of at least {n} characters"),
            Self::Enum { values } => format!("one of {}", values.join(", ")),
            Self::List { item } => format!("a list of {}", item.describe()),
            Self::Map { value } => format!("a map of names to {}", value.describe()),
            Self::Shape { fields } if fields.is_empty() => "an empty map {}".into(),
            Self::Shape { .. } => "a map".into(),
            Self::Selector { fields } => format!(
                "a map with exactly one of: {}",
                fields
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// ` from 0 to 10`, ` ≥ 0`, ` ≤ 10` or nothing.
fn range(minimum: Option<f64>, maximum: Option<f64>) -> String {
    match (minimum, maximum) {
        (Some(lo), Some(hi)) => format!(" from {lo} to {hi}"),
        (Some(lo), None) => format!(" ≥ {lo}"),
        (None, Some(hi)) => format!(" ≤ {hi}"),
        (None, None) => String::new(),
    }
}
