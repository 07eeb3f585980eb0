//! Checkpoints that cannot be silently corrupted: a flipped byte or a truncated file is a clean
//! error naming the file (and the tensor), and a run killed with SIGKILL at random moments while
//! it writes checkpoints always leaves a last checkpoint that loads and resumes bit for bit.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{curv, repository_root, scratch};

/// A small digits MLP trained with Adam (so the checkpoint holds optimizer state) for `steps`
/// steps, with a checkpoint every `every` steps (none when `None`).
fn small_program(directory: &Path, name: &str, steps: u32, every: Option<u32>) -> PathBuf {
    let data = repository_root().join("examples/data/digits.csv");
    let checkpoint = every.map_or(String::new(), |every| format!("\n    checkpoint every {every}"));
    let text = std::fs::read_to_string(repository_root().join("examples/digits_mlp.curv"))
        .unwrap()
        .replace("\"data/digits.csv\"", &format!("{:?}", data.to_str().unwrap()))
        .replace("dim H = 256", "dim H = 32")
        .replace("batch 128", "batch 32")
        .replace("steps 2000", &format!("steps {steps}{checkpoint}"));
    let path = directory.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run_ok(args: &[&str]) {
    let output = curv(args);
    assert_eq!(output.status.code(), Some(0), "curv {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// The byte range of tensor `name`'s data in a safetensors file.
fn data_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let (header, metadata) = curv_runtime::checkpoint::SafeTensors::read_metadata(bytes).unwrap();
    let info = metadata.info(name).unwrap_or_else(|| panic!("no tensor `{name}`"));
    8 + header + info.data_offsets.0..8 + header + info.data_offsets.1
}

#[test]
fn resuming_or_initialising_from_a_damaged_file_fails_naming_the_file_and_the_tensor() {
    let directory = scratch("checkpoints", "damaged");
    let program = small_program(&directory, "program.curv", 6, Some(3));
    let out = directory.join("out");
    let interp = ["--backend", "interp", "--quiet"];
    run_ok(
        &[&["run", program.to_str().unwrap(), "--steps", "3", "--out", out.to_str().unwrap()], &interp[..]].concat(),
    );
    let checkpoint = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let resume = |bytes: &[u8], name: &str| {
        let path = directory.join(name);
        std::fs::write(&path, bytes).unwrap();
        let resumed = directory.join(format!("resumed-{name}"));
        let output = curv(&[
            "run",
            program.to_str().unwrap(),
            "--backend",
            "interp",
            "--resume",
            path.to_str().unwrap(),
            "--out",
            resumed.to_str().unwrap(),
            "--quiet",
        ]);
        let trained = resumed.join("final.safetensors").exists();
        assert_eq!(trained, output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned(), path)
    };
    // The undamaged checkpoint resumes.
    let (code, stderr, _) = resume(&checkpoint, "sound.safetensors");
    assert_eq!(code, Some(0), "{stderr}");
    // One flipped bit in the middle of the optimizer state `v` of `w2`, and in parameter `b1`.
    for tensor in ["state.w2.v", "param.b1"] {
        let range = data_range(&checkpoint, tensor);
        let mut damaged = checkpoint.clone();
        damaged[(range.start + range.end) / 2] ^= 0x04;
        let (code, stderr, path) = resume(&damaged, &format!("flipped-{tensor}.safetensors"));
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("error: [E0601]"), "{stderr}");
        assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
        assert!(stderr.contains(&format!("tensor `{tensor}` is damaged")), "{stderr}");
    }
    // A flipped byte in the metadata, and a truncated file.
    let text: String = checkpoint.iter().map(|&byte| if byte.is_ascii() { byte as char } else { '?' }).collect();
    let mut damaged = checkpoint.clone();
    damaged[text.find("seed=0").unwrap() + 5] = b'1';
    let (code, stderr, _) = resume(&damaged, "metadata.safetensors");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: [E0602]") && stderr.contains("metadata is damaged"), "{stderr}");
    let (code, stderr, path) = resume(&checkpoint[..checkpoint.len() - 100], "truncated.safetensors");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: [E0600]") && stderr.contains(path.to_str().unwrap()), "{stderr}");

    // `--init` verifies the checksums of the parameters file too.
    let parameters = std::fs::read(out.join("final.safetensors")).unwrap();
    let mut damaged = parameters.clone();
    damaged[data_range(&parameters, "w3").start + 1] ^= 0x80;
    let init = directory.join("init.safetensors");
    std::fs::write(&init, &damaged).unwrap();
    let output =
        curv(&["run", program.to_str().unwrap(), "--backend", "interp", "--init", init.to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: [E0601]") && stderr.contains("tensor `w3` is damaged"), "{stderr}");
    std::fs::write(&init, &parameters).unwrap();
    let output =
        curv(&["run", program.to_str().unwrap(), "--backend", "interp", "--init", init.to_str().unwrap(), "--quiet"]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The temporary files in `directory` (`.NAME.PID.N.tmp`).
fn temporary_files(directory: &Path) -> Vec<String> {
    std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect()
}

/// splitmix64: the test's seeded random numbers.
/// The seed of the kill test's random delays: fixed, so a failure can be replayed.
const KILL_SEED: u64 = 19;

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// The number of SIGKILLs the kill test sends (each to a process that was still running).
const KILLS: usize = 50;

/// Runs with a checkpoint after every step are killed with SIGKILL at random moments (most of a
/// step's time is spent writing and syncing the checkpoint, so many kills land inside a write).
/// After each kill the last checkpoint must verify, and a run resumed from it must end with
/// exactly the final parameters of an uninterrupted run. The killed run is then itself resumed
/// from that checkpoint (and killed again), so kills also hit resumed runs; a chain of kills ends
/// when a run finishes, and its final parameters must match too.
#[test]
fn runs_killed_at_random_moments_while_writing_checkpoints_resume_bit_for_bit() {
    use std::os::unix::process::ExitStatusExt;
    let started = Instant::now();
    let seed = KILL_SEED;
    let mut random = Random(seed);
    let directory = scratch("checkpoints", "kills");
    let steps = 60;
    let program = small_program(&directory, "checkpointing.curv", steps, Some(1));
    // The same training without checkpoints: it resumes a checkpoint to the end quickly.
    let quiet_program = small_program(&directory, "plain.curv", steps, None);
    let reference = directory.join("reference");
    let reference_started = Instant::now();
    run_ok(&["run", program.to_str().unwrap(), "--backend", "interp", "--out", reference.to_str().unwrap(), "--quiet"]);
    let duration_ms = reference_started.elapsed().as_millis() as u64;
    let expected = std::fs::read(reference.join("final.safetensors")).unwrap();

    let (mut kills, mut chains, mut verified, mut torn_writes) = (0, 0, 0, 0);
    while kills < KILLS {
        chains += 1;
        let out = directory.join(format!("chain-{chains}"));
        let checkpoint = out.join("checkpoint.safetensors");
        let mut last_step = 0;
        loop {
            let mut args = vec!["run", program.to_str().unwrap(), "--backend", "interp"];
            if last_step > 0 {
                args.extend(["--resume", checkpoint.to_str().unwrap()]);
            }
            args.extend(["--out", out.to_str().unwrap(), "--quiet"]);
            let mut child = Command::new(env!("CARGO_BIN_EXE_curv"))
                .args(&args)
                .current_dir(repository_root())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            if last_step == 0 {
                // A fresh run: wait for its first checkpoint.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !checkpoint.exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // Up to the length of a whole run (at most 300 ms, which spans many steps and writes).
            std::thread::sleep(Duration::from_micros(random.below(duration_ms.min(300) * 1000)));
            child.kill().unwrap();
            let status = child.wait().unwrap();
            if status.success() {
                break;
            }
            assert_eq!(status.signal(), Some(9), "the run failed on its own: {status}");
            kills += 1;
            // A kill inside a write leaves the killed process's temporary file (the next run's
            // first write removes it).
            let killed = format!(".{}.", child.id());
            torn_writes += temporary_files(&out).iter().filter(|name| name.contains(&killed)).count();
            // The last checkpoint verifies and is not older than the one the run started from.
            let contents = curv_runtime::checkpoint::read_file::<f32>(&checkpoint)
                .unwrap_or_else(|error| panic!("kill {kills}: the last checkpoint does not load: {error}"));
            assert!(contents.verified, "kill {kills}: the checkpoint carries no checksums");
            let step: u32 = contents.metadata["step"].parse().unwrap();
            assert!(step >= last_step.max(1) && step <= steps, "kill {kills}: step {step} after step {last_step}");
            last_step = step;
            // Resumed to the end, it gives the uninterrupted run's final parameters, bit for bit.
            let resumed = directory.join(format!("resumed-{kills}"));
            run_ok(&[
                "run",
                quiet_program.to_str().unwrap(),
                "--backend",
                "interp",
                "--resume",
                checkpoint.to_str().unwrap(),
                "--out",
                resumed.to_str().unwrap(),
                "--quiet",
            ]);
            let actual = std::fs::read(resumed.join("final.safetensors")).unwrap();
            assert!(actual == expected, "kill {kills}: resuming step {step} did not end like the uninterrupted run");
            std::fs::remove_dir_all(&resumed).unwrap();
            verified += 1;
        }
        let actual = std::fs::read(out.join("final.safetensors")).unwrap();
        assert!(actual == expected, "chain {chains}: the run resumed after every kill ended differently");
        let left = temporary_files(&out);
        assert!(left.is_empty(), "chain {chains}: temporary files of killed runs are left: {left:?}");
    }
    eprintln!(
        "{kills} SIGKILLs in {chains} chains (seed {seed}), {torn_writes} of them inside a checkpoint write, {verified} \
         checkpoints resumed bit for bit; {:.1} s (an uninterrupted run takes {duration_ms} ms)",
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= KILLS && verified == kills);
}
