//! Errors for people: what a client or an operator reads about a model that
//! cannot be served or a load that failed.
//!
//! candle attaches a Rust backtrace to its errors' text when `RUST_BACKTRACE`
//! is set in the node's environment (about 1 KB of frames), and anyhow's
//! chain can hold several lines. A job's `error`, a refusal's reason and an
//! HTTP error body must not depend on the environment: one line, each cause
//! once, no frames.

/// One line: the error's causes, outermost first, their lines joined by
/// ": " without backtrace frames, at most `MAX_ERROR_CHARS`.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        for line in cause.to_string().lines().map(str::trim) {
            // Each text once: candle's wrappers repeat what they wrap.
            if !line.is_empty() && !is_frame(line) && !parts.iter().any(|p| p == line) {
                parts.push(line.to_string());
            }
        }
    }
    let mut s = parts.join(": ");
    if s.chars().count() > MAX_ERROR_CHARS {
        s = s.chars().take(MAX_ERROR_CHARS - 1).collect::<String>() + "…";
    }
    s
}

/// A line of a printed backtrace: `12: crate::function`, `at src/x.rs:3:4`,
/// or its heading.
fn is_frame(line: &str) -> bool {
    let numbered = line.split_once(": ").is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    numbered || line.starts_with("at ") || line == "stack backtrace:" || line.starts_with("disabled backtrace")
}

/// Longest error text a client is given.
pub const MAX_ERROR_CHARS: usize = 600;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backtraces_and_line_breaks_are_dropped() {
        let inner = candle_core::Error::Msg("cannot find tensor model.embed_tokens.weight".into());
        let with_bt = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = anyhow::Error::new(with_bt.context("building the text encoder"))
            .context("loading text_encoder/model.safetensors");
        let s = one_line(&e);
        assert_eq!(
            s,
            "loading text_encoder/model.safetensors: building the text encoder: cannot find tensor model.embed_tokens.weight"
        );
        assert!(!s.contains('\n'));
    }

    #[test]
    fn long_errors_are_cut() {
        let e = anyhow::anyhow!("{}", "x".repeat(5000));
        let s = one_line(&e);
        assert_eq!(s.chars().count(), MAX_ERROR_CHARS);
        assert!(s.ends_with('…'));
    }
}
