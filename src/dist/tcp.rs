//! The TCP collectives: rank 0 listens, every other rank connects to it, and each collective is
//! a star (a tree of depth one). An all-reduce sends every rank's buffer to rank 0, which sums
//! them in rank order, divides by the world size and sends the one result back, so every rank
//! ends with the same bits. Every read waits at most the job's timeout, and a rank that exits
//! or hangs ends the collective with an error naming it.
//!
//! It exists for CPU ranks and for the tests that run real processes; GPU ranks need NCCL.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::World;

const MAGIC: &[u8; 8] = b"LORADIST";

/// One process's end of the job's connections.
pub struct TcpComm {
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Rank 0: the connection to each other rank (index = rank; 0 unused). Others: rank 0's at 0.
    links: Mutex<Vec<Option<TcpStream>>>,
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpComm(rank {} of {})", self.rank, self.size)
    }
}

fn io_error(e: std::io::Error, peer: usize, timeout: Duration, what: &str) -> anyhow::Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
            "rank {peer} did not answer within {} s during {what}: it hangs or is far behind (raise [distributed] timeout_s if it is only slow)",
            timeout.as_secs()
        ),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            anyhow!("rank {peer} closed its connection during {what}: it exited or was killed (its own log says why)")
        }
        _ => anyhow!("{what} with rank {peer}: {e}"),
    }
}

fn write_frame(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&(data.len() as u64).to_le_bytes())?;
    s.write_all(data)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok(data)
}

impl TcpComm {
    /// Connect the job: rank 0 listens on `port` (all interfaces) and waits for every other rank;
    /// the others connect to `world.master_addr:port`, retrying until `timeout`. `job` (the
    /// pipeline's hash) must be the same on every rank: a rank started on another pipeline is
    /// refused by name.
    pub fn connect(world: &World, port: u16, timeout: Duration, job: &str) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<TcpStream>> = (0..world.size).map(|_| None).collect();
        if world.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port))
                .with_context(|| format!("rank 0 cannot listen on port {port} (in use? set [distributed] port or LORA_DIST_PORT)"))?;
            listener.set_nonblocking(true)?;
            let mut joined = 1;
            while joined < world.size {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false)?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(timeout))?;
                        let hello = read_frame(&mut s).with_context(|| format!("a connection from {from} sent no greeting"))?;
                        let (rank, size, their_job) = parse_hello(&hello).with_context(|| format!("a connection from {from} is not a lora rank"))?;
                        if size != world.size {
                            bail!("rank {rank} (from {from}) was started with a world of {size}, rank 0 with {}", world.size);
                        }
                        if their_job != job {
                            bail!("rank {rank} (from {from}) runs another pipeline (hash {their_job}, rank 0's is {job}): start every rank on the same file");
                        }
                        if rank == 0 || rank >= world.size || links[rank].is_some() {
                            bail!("two processes claim rank {rank} (the second from {from})");
                        }
                        write_frame(&mut s, b"ok")?;
                        links[rank] = Some(s);
                        joined += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = (1..world.size).filter(|r| links[*r].is_none()).map(|r| r.to_string()).collect();
                            bail!("rank(s) {} did not connect to rank 0 on port {port} within {} s", missing.join(", "), timeout.as_secs());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("accepting a rank's connection"),
                }
            }
        } else {
            let addr = (world.master_addr.as_str(), port)
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve MASTER_ADDR {:?}", world.master_addr))?
                .next()
                .with_context(|| format!("MASTER_ADDR {:?} resolves to no address", world.master_addr))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e).with_context(|| format!("rank {} cannot reach rank 0 at {addr} within {} s", world.rank, timeout.as_secs()))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            let mut hello = MAGIC.to_vec();
            hello.extend((world.rank as u64).to_le_bytes());
            hello.extend((world.size as u64).to_le_bytes());
            hello.extend(job.as_bytes());
            write_frame(&mut s, &hello).map_err(|e| io_error(e, 0, timeout, "joining"))?;
            let ok = read_frame(&mut s).map_err(|e| io_error(e, 0, timeout, "joining (rank 0 refused this rank; its log says why)"))?;
            if ok != b"ok" {
                bail!("rank 0 answered the greeting with {ok:?}");
            }
            links[0] = Some(s);
        }
        Ok(Self { rank: world.rank, size: world.size, timeout, links: Mutex::new(links) })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Replace `buf` on every rank by the mean of all ranks' `buf`s: summed in f32 in rank order
    /// on rank 0, divided by the world size there, and sent back, so every rank gets the same
    /// bits. Every rank must pass a buffer of the same length.
    pub fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()> {
        let mut links = self.links.lock().expect("comm lock");
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let floats = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect::<Vec<f32>>();
        if self.rank == 0 {
            let mut sum = buf.to_vec();
            for (peer, link) in links.iter_mut().enumerate().skip(1) {
                let s = link.as_mut().expect("connected");
                let theirs = read_frame(s).map_err(|e| io_error(e, peer, self.timeout, "the gradient all-reduce"))?;
                if theirs.len() != 4 * buf.len() {
                    bail!("rank {peer} sent {} values to the all-reduce, rank 0 has {}: the ranks train different adapters", theirs.len() / 4, buf.len());
                }
                for (a, b) in sum.iter_mut().zip(floats(&theirs)) {
                    *a += b;
                }
            }
            let n = self.size as f32;
            for (out, s) in buf.iter_mut().zip(&sum) {
                *out = s / n;
            }
            let result = bytes(buf);
            for (peer, link) in links.iter_mut().enumerate().skip(1) {
                write_frame(link.as_mut().expect("connected"), &result).map_err(|e| io_error(e, peer, self.timeout, "the gradient all-reduce"))?;
            }
        } else {
            let s = links[0].as_mut().expect("connected");
            write_frame(s, &bytes(buf)).map_err(|e| io_error(e, 0, self.timeout, "the gradient all-reduce"))?;
            let result = read_frame(s).map_err(|e| io_error(e, 0, self.timeout, "the gradient all-reduce"))?;
            if result.len() != 4 * buf.len() {
                bail!("rank 0 returned {} values from the all-reduce, this rank sent {}", result.len() / 4, buf.len());
            }
            buf.copy_from_slice(&floats(&result));
        }
        Ok(())
    }

    /// Rank 0's `data` on every rank (the others pass `None`).
    pub fn broadcast(&self, data: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut links = self.links.lock().expect("comm lock");
        if self.rank == 0 {
            let data = data.context("rank 0 must give the broadcast's data")?;
            for (peer, link) in links.iter_mut().enumerate().skip(1) {
                write_frame(link.as_mut().expect("connected"), data).map_err(|e| io_error(e, peer, self.timeout, "a broadcast"))?;
            }
            Ok(data.to_vec())
        } else {
            read_frame(links[0].as_mut().expect("connected")).map_err(|e| io_error(e, 0, self.timeout, "a broadcast from rank 0"))
        }
    }

    /// Rank 0's JSON value on every rank.
    pub fn broadcast_json<T: serde::Serialize + serde::de::DeserializeOwned>(&self, value: Option<&T>) -> Result<T> {
        let bytes = match value {
            Some(v) if self.rank == 0 => Some(serde_json::to_vec(v)?),
            _ => None,
        };
        let got = self.broadcast(bytes.as_deref())?;
        serde_json::from_slice(&got).context("reading rank 0's message")
    }
}

fn parse_hello(b: &[u8]) -> Result<(usize, usize, String)> {
    if b.len() < 24 || &b[..8] != MAGIC {
        bail!("wrong greeting");
    }
    let rank = u64::from_le_bytes(b[8..16].try_into()?) as usize;
    let size = u64::from_le_bytes(b[16..24].try_into()?) as usize;
    Ok((rank, size, String::from_utf8_lossy(&b[24..]).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(rank: usize, size: usize) -> World {
        World { rank, size, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: 0, launcher: super::super::Launcher::Torchrun }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Three ranks in threads: the mean is the rank-order sum over three (an independent f32
    /// computation), identical bits everywhere; broadcasts carry rank 0's bytes.
    #[test]
    fn all_reduce_mean_and_broadcast_over_three_ranks() {
        let port = free_port();
        let inputs: Vec<Vec<f32>> = (0..3).map(|r| (0..5).map(|i| (r * 10 + i) as f32 * 0.1 + 1e-7 * r as f32).collect()).collect();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let mut buf = inputs[r].clone();
                std::thread::spawn(move || {
                    let c = TcpComm::connect(&world(r, 3), port, Duration::from_secs(10), "job").unwrap();
                    c.all_reduce_mean(&mut buf).unwrap();
                    let b = c.broadcast((r == 0).then_some(&b"hello"[..])).unwrap();
                    (buf, b)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let want: Vec<f32> = (0..5).map(|i| (inputs[0][i] + inputs[1][i] + inputs[2][i]) / 3.0).collect();
        for (buf, b) in &results {
            assert_eq!(buf, &want);
            assert_eq!(b, b"hello");
        }
    }

    /// A rank that exits ends rank 0's collective with its name; a rank on another pipeline is
    /// refused by name.
    #[test]
    fn a_dead_rank_or_another_job_is_named() {
        let port = free_port();
        let worker = std::thread::spawn(move || {
            let c = TcpComm::connect(&world(1, 2), port, Duration::from_secs(10), "job").unwrap();
            drop(c);
        });
        let c = TcpComm::connect(&world(0, 2), port, Duration::from_secs(10), "job").unwrap();
        worker.join().unwrap();
        let err = c.all_reduce_mean(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("rank 1 closed its connection"), "{err}");

        let port = free_port();
        let worker = std::thread::spawn(move || TcpComm::connect(&world(1, 2), port, Duration::from_secs(10), "other").map(|_| ()));
        let err = TcpComm::connect(&world(0, 2), port, Duration::from_secs(10), "job").unwrap_err().to_string();
        assert!(err.contains("rank 1") && err.contains("another pipeline"), "{err}");
        assert!(worker.join().unwrap().is_err());
    }

    /// A rank that never answers: the collective ends after the timeout, naming it.
    #[test]
    fn a_hung_rank_times_out() {
        let port = free_port();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let c = TcpComm::connect(&world(1, 2), port, Duration::from_secs(10), "job").unwrap();
            rx.recv().unwrap();
            drop(c);
        });
        let c = TcpComm::connect(&world(0, 2), port, Duration::from_millis(300), "job").unwrap();
        let t = Instant::now();
        let err = c.all_reduce_mean(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("rank 1 did not answer"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        tx.send(()).unwrap();
        worker.join().unwrap();
    }
}
