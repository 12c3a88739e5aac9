//! Outbox intake. Being written.
use globset::{GlobBuilder, GlobMatcher};

/// Matches file names against the `include` glob, case-insensitively. Dot files
/// never match, whatever the glob, because producers write under such names.
#[derive(Debug, Clone)]
pub struct IncludeMatcher(GlobMatcher);

impl IncludeMatcher {
    pub fn new(glob: &str) -> Result<IncludeMatcher, globset::Error> {
        let glob = GlobBuilder::new(glob).case_insensitive(true).literal_separator(true).build()?;
        Ok(IncludeMatcher(glob.compile_matcher()))
    }

    pub fn is_match(&self, name: &str) -> bool {
        !name.starts_with('.') && self.0.is_match(name)
    }
}
