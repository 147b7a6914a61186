//! Keeping credentials out of text that may reach a user: every secret the storage
//! knows is replaced by a placeholder in error messages.

/// Placeholder written wherever a credential would have appeared.
const REDACTED: &str = "<redacted>";

/// Removes known credentials from text that may reach a user (error messages).
#[derive(Default)]
pub(super) struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub(super) fn add(&mut self, secret: &str) {
        // Very short values would redact innocent text and cannot be real keys anyway.
        if secret.len() >= 4 && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_owned());
            // Longest first, so a secret containing another is removed whole.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    pub(super) fn scrub(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), REDACTED)
        })
    }
}
