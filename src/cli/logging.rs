//! Logging set-up for every command: tracing to standard error, as text or JSON, with a
//! filter that can be swapped at run time (SIGHUP) and that always caps the hardware
//! crates whose trace output would carry APDUs (the PIN among them).
//!
//! Under systemd (`$JOURNAL_STREAM` set) text lines start with a `<N>` syslog priority,
//! which journald files as the line's priority, and carry no timestamp (journald adds one).
//!
//! Call [`init`] once, from the main thread, before any other thread starts.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;
use crate::signer::piv;

/// Swaps the filter at run time.
#[derive(Clone)]
pub struct FilterHandle(reload::Handle<EnvFilter, Registry>);

impl FilterHandle {
    /// Applies a new filter (e.g. after SIGHUP). The caps stay.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let filter = capped_filter(filter)?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// `filter` with the hardware crates capped at `warn` ([`piv::capped_log_filter`]: the
/// `yubikey` crate logs APDUs at trace level, and a VERIFY APDU holds the PIN). Any
/// directive of the user's for those targets, or for a span without a target, is dropped,
/// then the caps are appended. [`init`] also installs [`piv::passes_log_cap`] as a fixed
/// filter of its own, which holds whatever this text enables.
pub fn capped_filter(filter: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(piv::capped_log_filter(filter))
        .map_err(|e| format!("bad log filter {filter:?}: {e}"))
}

/// Installs the global subscriber. Returns the handle that swaps its filter.
pub fn init(filter: &str, format: LogFormat) -> Result<FilterHandle, String> {
    let (filter_layer, handle) = reload::Layer::new(capped_filter(filter)?);
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !under_journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Beside the swappable filter, a fixed one that no configuration reaches.
    let registry = tracing_subscriber::registry()
        .with(filter_layer)
        .with(tracing_subscriber::filter::filter_fn(piv::passes_log_cap));
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text if under_journald => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(SyslogPrefix(
                        tracing_subscriber::fmt::format()
                            .without_time()
                            .with_ansi(false),
                    ))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(FilterHandle(handle))
}

/// Prefixes each line with its sd-daemon(3) priority, `<3>` error … `<7>` debug.
struct SyslogPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_crates_stay_capped() {
        let f = capped_filter("trace,yubikey=trace,pcsc::x=debug,audit=info").unwrap();
        let text = f.to_string();
        assert!(text.contains("yubikey=warn"), "{text}");
        assert!(!text.contains("yubikey=trace"), "{text}");
        assert!(!text.contains("pcsc::x=debug"), "{text}");
        assert!(text.contains("audit=info"), "{text}");
        // A target that merely starts with the same letters is left alone.
        assert!(capped_filter("yubikeyish=trace")
            .unwrap()
            .to_string()
            .contains("yubikeyish=trace"));
        assert!(capped_filter("a=b=c").is_err());
        // A span directive without a target would enable the crates' events inside it.
        let text = capped_filter("[sign]=trace").unwrap().to_string();
        assert!(!text.contains("[sign]"), "{text}");
    }

    #[test]
    fn priorities_match_sd_daemon() {
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }
}
