//! Structured logging with etcd's knobs: `--log-level`, `--log-format
//! json|console`, `--log-outputs default|stderr|stdout|<file>`.

use std::fs::OpenOptions;
use std::io;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

pub fn init(config: &Config) -> io::Result<()> {
    let writer: BoxMakeWriter = match config.log_outputs.first().map(String::as_str) {
        None | Some("default") | Some("stderr") => BoxMakeWriter::new(io::stderr),
        Some("stdout") => BoxMakeWriter::new(io::stdout),
        Some(path) => {
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            BoxMakeWriter::new(Mutex::new(file))
        }
    };
    // openraft logs every step at info; keep it at warn unless debugging.
    let filter = if config.log_level == "debug" {
        EnvFilter::new("debug")
    } else {
        EnvFilter::new(format!("{},openraft=warn,h2=warn,hyper=warn,tower=warn", config.log_level))
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_target(false);
    let result = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Console => builder.try_init(),
    };
    result.map_err(|e| io::Error::other(e.to_string()))
}
