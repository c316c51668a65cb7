//! Our own launcher for one machine (`lora run FILE --ranks N`, `[distributed] ranks = N`): start
//! N copies of this `lora run` with torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) on a free local port. Rank 0 keeps the
//! terminal (its progress bar counts the job's updates); the other ranks' log lines come through
//! prefixed with their rank. When a rank fails, the others are stopped at once and the launcher
//! exits with the failed rank's code.
//!
//! Signals: the ranks run in a process group of their own, so a terminal's Ctrl-C reaches the
//! launcher alone, which passes the stop signal (SIGINT, SIGTERM, SIGHUP) on to every rank once;
//! they finish the step, rank 0 saves a checkpoint, and the launcher exits with their code. A
//! rank whose launcher dies (even by SIGKILL) gets SIGTERM from the kernel (Linux).

use std::io::BufRead;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

/// This process's arguments without `--ranks N` / `--ranks=N`.
fn child_args() -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--ranks" {
            skip = true;
            continue;
        }
        if s.starts_with("--ranks=") {
            continue;
        }
        out.push(a);
    }
    out
}

/// Start `n` ranks of this run and wait for them; the exit code is rank 0's, or the first
/// failed rank's.
pub fn launch_local(n: usize) -> Result<ExitCode> {
    // Stop signals set a flag here instead of ending the launcher (and orphaning the ranks).
    let _ = crate::util::interrupt::flag();
    let exe = std::env::current_exe().context("finding this executable to start the ranks")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("finding a free local port for the ranks")?.port();
    // The cores are shared: each rank gets its part of this process's thread count.
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let per_rank = (threads / n).max(1);
    tracing::info!("launching {n} ranks on this machine (port {port}, {per_rank} threads each)");
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut forwarders = Vec::new();
    for rank in 0..n {
        let mut c = Command::new(&exe);
        c.args(child_args())
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("LORA_DIST_PORT", port.to_string())
            .env("RAYON_NUM_THREADS", per_rank.to_string());
        if rank > 0 {
            c.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            c.process_group(0);
            #[cfg(target_os = "linux")]
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the child.
            unsafe {
                c.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let mut child = c.spawn().with_context(|| format!("starting rank {rank}"))?;
        if let Some(err) = child.stderr.take() {
            forwarders.push(std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("rank {rank}: {line}");
                }
            }));
        }
        children.push(child);
    }
    let mut codes: Vec<Option<i32>> = vec![None; n];
    let mut failed: Option<(usize, i32)> = None;
    let mut forwarded = false;
    while codes.iter().any(Option::is_none) {
        if !forwarded && crate::util::interrupt::requested() {
            forwarded = true;
            let sig = i32::from(crate::util::interrupt::exit_code()) - 128;
            for (rank, child) in children.iter().enumerate() {
                if codes[rank].is_none() {
                    #[cfg(unix)]
                    // SAFETY: kill(2) on a child this process started and has not reaped.
                    unsafe {
                        libc::kill(child.id() as libc::pid_t, sig);
                    }
                }
            }
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if codes[rank].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                let code = status.code().unwrap_or(1);
                codes[rank] = Some(code);
                // After a stop signal the ranks end with 128 + its number on purpose.
                if code != 0 && failed.is_none() && !forwarded {
                    failed = Some((rank, code));
                }
            }
        }
        if let Some((rank, code)) = failed {
            // One rank failed: the others cannot finish the job; stop them now rather than at
            // their next collective's timeout.
            for (r, child) in children.iter_mut().enumerate() {
                if codes[r].is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                    codes[r] = Some(1);
                }
            }
            for f in forwarders {
                let _ = f.join();
            }
            eprintln!("error: rank {rank} of {n} failed (exit code {code}); the other ranks were stopped");
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in forwarders {
        let _ = f.join();
    }
    Ok(ExitCode::from(u8::try_from(codes[0].unwrap_or(0)).unwrap_or(1)))
}
