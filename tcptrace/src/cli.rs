//! Command-line interface: every flag, its default, and its environment variable (so that
//! systemd units and container images configure tcptrace the usual way).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "tcptrace",
    version,
    about = "Trace every TCP state change on this machine and flag leaked sockets (stuck CLOSE_WAIT) and other anomalies.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Trace live (the default when no subcommand is given).
    Trace(TraceArgs),
    /// Replay a recorded log, NDJSON or a binary capture (a file, or - for stdin), through the
    /// lifecycle engine.
    Analyze(AnalyzeArgs),
    /// Start a leaking server on loopback, drive a client at it, and show the alert.
    Demo(DemoArgs),
    /// Internal: the leaking server that `demo` and the tests start.
    #[command(hide = true)]
    LeakyServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: String,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum View {
    /// One line per transition, alerts inline.
    Transitions,
    /// One line per finished connection.
    Lifecycles,
    /// Alerts only.
    Alerts,
    /// Transitions, lifecycles and alerts.
    All,
    /// Nothing on stdout (use with --output, or with --metrics when tracing).
    None,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// One JSON object per line (the schema in the README).
    Ndjson,
    /// One header row, then one row per record.
    Csv,
    /// Compact binary records of the transitions, for `tcptrace analyze` to replay (a
    /// quarter to a fifth of NDJSON's size, and far cheaper to write and to read); lifecycles and
    /// alerts are recomputed by the replay.
    Binary,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m)"))
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// What to print on stdout.
    #[arg(long, value_enum, default_value_t = View::Transitions, env = "TCPTRACE_VIEW")]
    pub view: View,
    /// Record everything (transitions, lifecycles, alerts, summary) to FILE; - for stdout.
    #[arg(short, long, value_name = "FILE", env = "TCPTRACE_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Format of --output.
    #[arg(long, value_enum, default_value_t = FileFormat::Ndjson, env = "TCPTRACE_FORMAT")]
    pub format: FileFormat,
    /// Rotate --output once it reaches this size (e.g. 100M); 0 never rotates. SIGHUP
    /// reopens the file either way, for logrotate.
    #[arg(long, default_value = "0", value_parser = crate::output::parse_size, requires = "output", env = "TCPTRACE_ROTATE_SIZE")]
    pub rotate_size: u64,
    /// Rotated files to keep (FILE.1 … FILE.N).
    #[arg(
        long,
        default_value_t = 5,
        requires = "output",
        env = "TCPTRACE_ROTATE_KEEP"
    )]
    pub rotate_keep: u32,
    /// Serve Prometheus/OpenMetrics on http://ADDR/metrics (and /healthz). Without ADDR:
    /// 127.0.0.1:9464; binding beyond loopback is an explicit choice.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9464", env = "TCPTRACE_METRICS")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Stop after this long (e.g. 30s); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration, env = "TCPTRACE_DURATION")]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub filter: crate::filter::FilterArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// Kernel ring-buffer size in MiB; the kernel needs a power of two, so another size is
    /// rounded up to the next one (and said so at start).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024), env = "TCPTRACE_RING_MB")]
    pub ring_mb: u32,
    /// Don't follow TIME_WAIT (timewait sockets, through the timer tracepoints): lifecycles
    /// then end at FIN_WAIT2/CLOSING -> CLOSE, as the state tracepoint reports them.
    #[arg(long, env = "TCPTRACE_NO_TIMEWAIT", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_timewait: bool,
    /// Don't take the start-up snapshot of the TCP sockets that already exist.
    #[arg(long, env = "TCPTRACE_NO_SNAPSHOT", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_snapshot: bool,
}

/// Lifecycle-engine and anomaly-rule settings shared by live tracing, analyze and demo.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Most connections tracked at once; beyond it the least recently active are evicted
    /// (and counted).
    #[arg(long, default_value_t = 1_000_000, value_parser = parse_max_connections, env = "TCPTRACE_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Alert when a socket stays in CLOSE_WAIT longer than this.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "TCPTRACE_CLOSE_WAIT_THRESHOLD")]
    pub close_wait_threshold: Duration,
    /// Alert when a socket stays in FIN_WAIT2 longer than this [default: the kernel's
    /// net.ipv4.tcp_fin_timeout].
    #[arg(long, value_parser = parse_duration, env = "TCPTRACE_FIN_WAIT2_THRESHOLD")]
    pub fin_wait2_threshold: Option<Duration>,
    /// Alert when a handshake takes longer than this.
    #[arg(long, default_value = "1s", value_parser = parse_duration, env = "TCPTRACE_SLOW_CONNECT_THRESHOLD")]
    pub slow_connect_threshold: Duration,
}

/// `--max-connections`: at least 1000, so that the engine can hold the connections of a
/// moment (fewer would evict connections still in their handshake and classify nothing).
fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.trim().replace('_', "").parse::<usize>() {
        Ok(n) if n >= 1000 => Ok(n),
        Ok(n) => Err(format!(
            "{n} is too few: the engine needs room for at least 1000 connections"
        )),
        Err(_) => Err(format!("{s:?} is not a number of connections")),
    }
}

#[derive(Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// The log to replay, NDJSON or binary (as written by --output); - or nothing for stdin.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Skip malformed lines (counted) instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad: bool,
    /// What to print.
    #[arg(long, value_enum, default_value_t = View::All)]
    pub view: View,
    /// Write the replay's records (transitions, lifecycles, alerts, summary) to OUT, a new
    /// file (an existing one must be empty), or - for stdout.
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Format of --output (binary converts a log into a binary capture).
    #[arg(long, value_enum, default_value_t = FileFormat::Ndjson, requires = "output")]
    pub format: FileFormat,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// How many sockets the demo server leaks (1-1000).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub leaks: u16,
    /// CLOSE_WAIT threshold for the demo (short, so the alert shows within seconds).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub threshold: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_subcommands_parse() {
        let cli = Cli::try_parse_from(["tcptrace"]).expect("no args is live tracing");
        assert!(cli.command.is_none());
        assert_eq!(cli.trace.view, View::Transitions);
        assert_eq!(
            cli.trace.engine.close_wait_threshold,
            Duration::from_secs(30)
        );
        let cli =
            Cli::try_parse_from(["tcptrace", "--view", "alerts", "--duration", "1500ms"]).unwrap();
        assert_eq!(cli.trace.view, View::Alerts);
        assert_eq!(cli.trace.duration, Some(Duration::from_millis(1500)));
        let cli = Cli::try_parse_from(["tcptrace", "analyze", "-", "--skip-bad"]).unwrap();
        match cli.command {
            Some(Command::Analyze(a)) => {
                assert!(a.skip_bad);
                assert_eq!(a.file, Some(PathBuf::from("-")));
            }
            other => panic!("expected analyze, got {other:?}"),
        }
    }

    #[test]
    fn bad_flags_are_errors() {
        assert!(Cli::try_parse_from(["tcptrace", "--view", "everything"]).is_err());
        assert!(Cli::try_parse_from(["tcptrace", "--duration", "soon"]).is_err());
        assert!(Cli::try_parse_from(["tcptrace", "--ring-mb", "0"]).is_err());
        assert!(Cli::try_parse_from(["tcptrace", "--bogus"]).is_err());
    }
}
