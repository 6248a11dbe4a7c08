//! `trackgate decode`: frames from arguments, a file or stdin → JSON Lines on stdout.
//!
//! Rejected frames are printed as `{"error":{…}}` lines on stdout, in order with the good
//! ones, so a log of a device session reads top to bottom; the exit status is 1 at the end
//! if any frame was rejected. I/O and usage problems go to stderr with exit status 2.

use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;
use trackgate_protocols::json::{decode_stream, error_json};
use trackgate_protocols::{DEFAULT_MAX_FRAME_BYTES, Direction, Framer};

/// Arguments of `trackgate decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// A frame as hex (whitespace ignored); may be given several times. Each is decoded on
    /// its own, so a broken one cannot swallow the next.
    #[arg(long = "hex", value_name = "HEX", conflicts_with = "file")]
    pub hex: Vec<String>,

    /// Read the input as text with one hex frame per line (blank lines and `#` comments
    /// skipped) instead of raw bytes.
    #[arg(long)]
    pub hex_lines: bool,

    /// Raw capture (or, with --hex-lines, hex lines) to decode; `-` or absent means stdin.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Pretty-print each JSON object over several lines.
    #[arg(long)]
    pub pretty: bool,

    /// Frames whose declared length exceeds this are rejected (`length` error).
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES, value_name = "BYTES")]
    pub max_frame_bytes: usize,

    /// Decode frames the server sends (`@@`) instead of device reports (`$$`).
    #[arg(long)]
    pub server_frames: bool,
}

/// Run `trackgate decode`.
pub(super) fn run(args: &DecodeArgs) -> ExitCode {
    match execute(args, &mut BufWriter::new(io::stdout().lock())) {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::FAILURE,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trackgate decode: {e}");
            ExitCode::from(2)
        }
    }
}

/// Decode per `args` into `out`; returns whether any error line was written.
fn execute(args: &DecodeArgs, out: &mut impl Write) -> io::Result<bool> {
    let direction = if args.server_frames {
        Direction::ServerToDevice
    } else {
        Direction::DeviceToServer
    };
    let framer = Framer::new(direction, args.max_frame_bytes);
    let mut failed = false;
    if !args.hex.is_empty() {
        for h in &args.hex {
            failed |= decode_hex(&framer, h, args.pretty, out)?;
        }
    } else {
        let input = read_input(args.file.as_ref())?;
        if args.hex_lines {
            let text = String::from_utf8_lossy(&input);
            for line in text.lines() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                failed |= decode_hex(&framer, line, args.pretty, out)?;
            }
        } else {
            let (lines, f) = decode_stream(&framer, &input);
            write_lines(&lines, args.pretty, out)?;
            failed |= f;
        }
    }
    out.flush()?;
    Ok(failed)
}

fn decode_hex(
    framer: &Framer,
    hex_text: &str,
    pretty: bool,
    out: &mut impl Write,
) -> io::Result<bool> {
    let compact: String = hex_text.chars().filter(|c| !c.is_whitespace()).collect();
    match hex::decode(&compact) {
        Ok(bytes) => {
            let (lines, failed) = decode_stream(framer, &bytes);
            write_lines(&lines, pretty, out)?;
            Ok(failed)
        }
        Err(e) => {
            let line = error_json("hex", "input", 0, &format!("not valid hex: {e}"));
            write_lines(&[line], pretty, out)?;
            Ok(true)
        }
    }
}

fn read_input(file: Option<&PathBuf>) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match file {
        Some(p) if p.as_os_str() != "-" => {
            buf = std::fs::read(p)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        }
        _ => {
            io::stdin().lock().read_to_end(&mut buf)?;
        }
    }
    Ok(buf)
}

fn write_lines(lines: &[Value], pretty: bool, out: &mut impl Write) -> io::Result<()> {
    for line in lines {
        if pretty {
            serde_json::to_writer_pretty(&mut *out, line)?;
        } else {
            serde_json::to_writer(&mut *out, line)?;
        }
        out.write_all(b"\n")?;
    }
    Ok(())
}
