//! `mipha-convert`: Hugging Face Mipha checkpoint -> `.mqf`, and `inspect`, `verify`,
//! `synth`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mipha_convert::{ConvertOptions, QuantType, SynthOptions};

#[derive(Parser)]
#[command(
    name = "mipha-convert",
    version,
    about = "Convert a Hugging Face Mipha-3B checkpoint to .mqf; inspect, verify or synthesise .mqf files",
    // `mipha-convert <HF_DIR> -o OUT --quant Q` and `mipha-convert inspect FILE` share
    // one command line: a subcommand name wins, and the convert arguments are only
    // required when no subcommand is given.
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    convert: ConvertArgs,
}

#[derive(Args)]
struct ConvertArgs {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer files)
    #[arg(value_name = "HF_DIR", required = true)]
    input: Option<PathBuf>,
    /// Output .mqf file
    #[arg(short, long, value_name = "OUT.mqf", required = true)]
    output: Option<PathBuf>,
    /// Storage type of the language model's matrices (embeddings and lm_head included)
    #[arg(long, value_enum, required = true)]
    quant: Option<Quant>,
    /// Storage type of the vision tower's and projector's matrices [default: --quant]
    #[arg(long, value_enum)]
    vision_quant: Option<Quant>,
    /// No progress bar or summary
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Print a file's version, metadata and tensor table
    Inspect {
        file: PathBuf,
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Check every tensor's checksum; exit code 1 on damage
    Verify { file: PathBuf },
    /// Write a model in a config's real shapes with seeded random weights
    Synth {
        /// A Mipha config.json (a preprocessor_config.json beside it is used if present)
        #[arg(long, value_name = "config.json")]
        config: PathBuf,
        #[arg(short, long, value_name = "OUT.mqf")]
        output: PathBuf,
        #[arg(long, value_enum)]
        quant: Quant,
        /// [default: --quant]
        #[arg(long, value_enum)]
        vision_quant: Option<Quant>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// No progress bar or summary
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Quant {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

impl From<Quant> for QuantType {
    fn from(q: Quant) -> Self {
        match q {
            Quant::F32 => QuantType::F32,
            Quant::F16 => QuantType::F16,
            Quant::Bf16 => QuantType::BF16,
            Quant::Q8_0 => QuantType::Q8_0,
            Quant::Q4_0 => QuantType::Q4_0,
        }
    }
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

fn run(cli: Cli) -> Result<(), mipha_convert::ConvertError> {
    match cli.command {
        Some(Command::Inspect { file, json }) => {
            print!("{}", mipha_convert::inspect(&file, json)?);
        }
        Some(Command::Verify { file }) => {
            let r = mipha_convert::verify(&file)?;
            println!("OK: {} tensors, {} bytes verified", r.tensors, r.bytes);
        }
        Some(Command::Synth {
            config,
            output,
            quant,
            vision_quant,
            seed,
            quiet,
        }) => {
            let quant: QuantType = quant.into();
            let opts = SynthOptions {
                config,
                output,
                quant,
                vision_quant: vision_quant.map_or(quant, Into::into),
                seed,
                progress: !quiet,
            };
            let r = mipha_convert::synth(&opts)?;
            if !quiet {
                eprintln!(
                    "wrote {}: {} tensors, {} parameters, {} in {:.1}s (seed {})",
                    r.output.display(),
                    r.tensors,
                    r.params,
                    mib(r.file_size),
                    r.seconds,
                    seed
                );
            }
        }
        None => {
            let a = cli.convert;
            // clap enforces these when no subcommand is given.
            let (Some(input), Some(output), Some(quant)) = (a.input, a.output, a.quant) else {
                unreachable!("required by clap")
            };
            let quant: QuantType = quant.into();
            let mut opts = ConvertOptions::new(input, output, quant);
            opts.vision_quant = a.vision_quant.map_or(quant, Into::into);
            opts.progress = !a.quiet;
            let r = mipha_convert::convert_checkpoint(&opts)?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            if !a.quiet {
                for f in &r.fallbacks {
                    eprintln!("fallback: {f}");
                }
                eprintln!(
                    "wrote {}: {} tensors ({} dropped, {} fallbacks), {} from {} of checkpoint in {:.1}s",
                    r.output.display(),
                    r.tensors,
                    r.dropped.len(),
                    r.fallbacks.len(),
                    mib(r.file_size),
                    mib(r.source_bytes),
                    r.seconds
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
