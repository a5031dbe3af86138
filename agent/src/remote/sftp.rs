//! A blocking SFTP v3 client over a byte pipe (in the agent: the stdin and
//! stdout of `ssh -s <host> sftp` through the session's master).
//!
//! One request is in flight at a time, and every answer is awaited with a
//! deadline ([`Sftp::set_timeout`], [`DEFAULT_REQUEST_TIMEOUT`]): a stalled
//! server gives `TimedOut`, never a hang. Two threads move the bytes (one
//! writes requests, one reads and frames replies, refusing a packet over
//! 256 KiB before allocating it), so neither a full pipe nor a silent one
//! can block the caller past the deadline. After a timeout or a malformed
//! reply the client is unusable (the pipe may hold half an answer): every
//! later call fails, and the caller opens a new one.
//!
//! Status codes map to `io::ErrorKind`: `NO_SUCH_FILE` → `NotFound`,
//! `PERMISSION_DENIED` → `PermissionDenied`, `OP_UNSUPPORTED` and a missing
//! extension → `Unsupported`, `FAILURE` and the rest → `Other` with the
//! server's message (clipped, escaped). OpenSSH's `sftp-server` reports
//! `EEXIST` as plain `FAILURE`; [`Sftp::create_excl`] tells it apart with an
//! `lstat` and returns `AlreadyExists`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::wire::{self, Attrs, Reply, Request};
use crate::model::fmt::clipped;

/// How long one request may wait for its answer unless set otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest chunk written or read per request (every SFTP server
/// accepts 32 KiB).
pub const CHUNK: usize = 32 * 1024;
/// The most entries [`Sftp::read_dir`] accepts.
pub const MAX_DIR_ENTRIES: usize = 100_000;

pub const EXT_FSYNC: &str = "fsync@openssh.com";
pub const EXT_POSIX_RENAME: &str = "posix-rename@openssh.com";
pub const EXT_HARDLINK: &str = "hardlink@openssh.com";

/// An open remote file (or directory, for [`Sftp::fsync_dir`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Handle {
    bytes: Vec<u8>,
}

/// A live SFTP channel.
pub struct Sftp {
    to_writer: Option<mpsc::Sender<Vec<u8>>>,
    from_reader: mpsc::Receiver<io::Result<Vec<u8>>>,
    next_id: u32,
    timeout: Duration,
    extensions: Vec<(String, String)>,
    /// Why the channel is unusable, once it is.
    broken: Option<String>,
    /// The local `ssh` carrying the channel, stopped on drop.
    child: Option<Child>,
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the sftp server does not support {what}"),
    )
}

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A status code and the server's message as an `io::Error`.
pub fn status_error(code: u32, message: &str) -> io::Error {
    let kind = match code {
        wire::FX_NO_SUCH_FILE => io::ErrorKind::NotFound,
        wire::FX_PERMISSION_DENIED => io::ErrorKind::PermissionDenied,
        wire::FX_OP_UNSUPPORTED => io::ErrorKind::Unsupported,
        wire::FX_EOF => io::ErrorKind::UnexpectedEof,
        _ => io::ErrorKind::Other,
    };
    let name = match code {
        wire::FX_EOF => "end of file",
        wire::FX_NO_SUCH_FILE => "no such file",
        wire::FX_PERMISSION_DENIED => "permission denied",
        wire::FX_FAILURE => "failure",
        wire::FX_BAD_MESSAGE => "bad message",
        wire::FX_OP_UNSUPPORTED => "operation unsupported",
        _ => "error",
    };
    let message = clipped(message, 200);
    if message.is_empty() || message.eq_ignore_ascii_case(name) {
        io::Error::new(kind, format!("sftp server: {name} (status {code})"))
    } else {
        io::Error::new(kind, format!("sftp server: {message} (status {code})"))
    }
}

impl Sftp {
    /// Starts SFTP v3 over `reader`/`writer` (the server's output and
    /// input): sends `SSH_FXP_INIT` and reads the server's version and
    /// extensions, within `timeout`.
    pub fn over_pipes(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        timeout: Duration,
    ) -> io::Result<Sftp> {
        Self::start(reader, writer, None, timeout)
    }

    pub(super) fn start(
        mut reader: impl Read + Send + 'static,
        mut writer: impl Write + Send + 'static,
        child: Option<Child>,
        timeout: Duration,
    ) -> io::Result<Sftp> {
        let (to_writer, requests) = mpsc::channel::<Vec<u8>>();
        let (replies, from_reader) = mpsc::channel();
        thread::Builder::new()
            .name("sftp-write".into())
            .spawn(move || {
                for packet in requests {
                    if writer
                        .write_all(&packet)
                        .and_then(|()| writer.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            })?;
        thread::Builder::new()
            .name("sftp-read".into())
            .spawn(move || {
                loop {
                    let packet = wire::read_packet(&mut reader);
                    let failed = packet.is_err();
                    if replies.send(packet).is_err() || failed {
                        break;
                    }
                }
            })?;
        let mut sftp = Sftp {
            to_writer: Some(to_writer),
            from_reader,
            next_id: 1,
            timeout,
            extensions: Vec::new(),
            broken: None,
            child,
        };
        let reply = sftp.exchange(Request::new(wire::FXP_INIT, None).u32(3).finish(), None)?;
        match reply {
            Reply::Version {
                version: 3,
                extensions,
            } => sftp.extensions = extensions,
            Reply::Version { version, .. } => {
                return Err(protocol(format!(
                    "sftp server speaks version {version}, not 3"
                )));
            }
            _ => {
                return Err(protocol(
                    "sftp server did not answer init with its version".into(),
                ));
            }
        }
        Ok(sftp)
    }

    /// How long each later request may wait for its answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The extensions the server announced (name, data).
    pub fn extensions(&self) -> &[(String, String)] {
        &self.extensions
    }

    fn has(&self, ext: &str) -> bool {
        self.extensions.iter().any(|(n, _)| n == ext)
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.broken = Some(e.to_string());
        e
    }

    /// Sends one packet and waits for its answer (with the given id).
    fn exchange(&mut self, packet: Vec<u8>, id: Option<u32>) -> io::Result<Reply> {
        if let Some(why) = &self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("sftp channel unusable after an earlier error ({why})"),
            ));
        }
        let sent = self
            .to_writer
            .as_ref()
            .is_some_and(|w| w.send(packet).is_ok());
        if !sent {
            let e = io::Error::new(io::ErrorKind::BrokenPipe, "sftp channel closed");
            return Err(self.fail(e));
        }
        let deadline = Instant::now() + self.timeout;
        let body = match self
            .from_reader
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Ok(body)) => body,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "sftp server closed the channel",
                );
                return Err(self.fail(e));
            }
            Ok(Err(e)) => return Err(self.fail(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("sftp server did not answer within {:?}", self.timeout),
                );
                return Err(self.fail(e));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "sftp channel closed");
                return Err(self.fail(e));
            }
        };
        let reply = match wire::decode(&body) {
            Ok(r) => r,
            Err(e) => return Err(self.fail(e)),
        };
        if reply.id() != id {
            let e = protocol(format!(
                "sftp server answered request {:?} with a reply to {:?}",
                id,
                reply.id()
            ));
            return Err(self.fail(e));
        }
        Ok(reply)
    }

    fn call(&mut self, kind: u8, build: impl FnOnce(Request) -> Request) -> io::Result<Reply> {
        let id = self.id();
        let packet = build(Request::new(kind, Some(id))).finish();
        self.exchange(packet, Some(id))
    }

    fn unexpected(&mut self, reply: &Reply) -> io::Error {
        let e = protocol(format!("sftp server sent an unexpected reply: {reply:?}"));
        let e = protocol(clipped(&e.to_string(), 200));
        self.fail(e)
    }

    fn status(&mut self, reply: Reply) -> io::Result<()> {
        match reply {
            Reply::Status {
                code: wire::FX_OK, ..
            } => Ok(()),
            Reply::Status { code, message, .. } => Err(status_error(code, &message)),
            other => Err(self.unexpected(&other)),
        }
    }

    fn attrs(&mut self, reply: Reply) -> io::Result<Attrs> {
        match reply {
            Reply::Attrs { attrs, .. } => Ok(attrs),
            Reply::Status { code, message, .. } => Err(status_error(code, &message)),
            other => Err(self.unexpected(&other)),
        }
    }

    fn handle(&mut self, reply: Reply) -> io::Result<Handle> {
        match reply {
            Reply::Handle { handle, .. } => Ok(Handle { bytes: handle }),
            Reply::Status { code, message, .. } => Err(status_error(code, &message)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The attributes of `p` itself (a symlink is not followed).
    pub fn lstat(&mut self, p: &Path) -> io::Result<Attrs> {
        let r = self.call(wire::FXP_LSTAT, |r| r.bytes(path_bytes(p)))?;
        self.attrs(r)
    }

    /// The attributes of what `p` names (symlinks followed).
    pub fn stat(&mut self, p: &Path) -> io::Result<Attrs> {
        let r = self.call(wire::FXP_STAT, |r| r.bytes(path_bytes(p)))?;
        self.attrs(r)
    }

    /// Creates `p`, which must not exist, for writing, with permissions
    /// `mode` before any byte is written: the open carries the mode
    /// (`open(O_CREAT|O_EXCL|O_WRONLY, mode)` on the server, narrowed by
    /// its umask), then an `fsetstat` (`fchmod`, no umask) sets it exactly.
    pub fn create_excl(&mut self, p: &Path, mode: u32) -> io::Result<Handle> {
        let flags = wire::FXF_WRITE | wire::FXF_CREAT | wire::FXF_EXCL;
        let r = self.call(wire::FXP_OPEN, |r| {
            r.bytes(path_bytes(p))
                .u32(flags)
                .attrs(None, Some(mode & 0o7777))
        })?;
        let h = match self.handle(r) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::Other && self.broken.is_none() => {
                if self.lstat(p).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("file exists ({e})"),
                    ));
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = self.fsetstat(&h, None, None, Some(mode)) {
            let _ = self.close(h);
            return Err(e);
        }
        Ok(h)
    }

    /// Opens `p` for reading.
    pub fn open_read(&mut self, p: &Path) -> io::Result<Handle> {
        let r = self.call(wire::FXP_OPEN, |r| {
            r.bytes(path_bytes(p)).u32(wire::FXF_READ).attrs(None, None)
        })?;
        self.handle(r)
    }

    /// Sets the owner and/or the permissions of an open file (`fchown`,
    /// `fchmod` on OpenSSH). Owner and group travel together in SFTP v3:
    /// when only one is given the other is sent as `0xffffffff`, which
    /// `fchown(2)` reads as "leave unchanged".
    pub fn fsetstat(
        &mut self,
        h: &Handle,
        uid: Option<u32>,
        gid: Option<u32>,
        mode: Option<u32>,
    ) -> io::Result<()> {
        let owner = match (uid, gid) {
            (Some(u), Some(g)) => Some((u, g)),
            (None, None) => None,
            (Some(u), None) => Some((u, u32::MAX)),
            (None, Some(g)) => Some((u32::MAX, g)),
        };
        if owner.is_none() && mode.is_none() {
            return Ok(());
        }
        let r = self.call(wire::FXP_FSETSTAT, |r| {
            r.bytes(&h.bytes).attrs(owner, mode.map(|m| m & 0o7777))
        })?;
        self.status(r)
    }

    /// Writes all of `bytes` from offset 0, in chunks of at most 32 KiB.
    pub fn write_all(&mut self, h: &Handle, bytes: &[u8]) -> io::Result<()> {
        let mut offset = 0u64;
        for chunk in bytes.chunks(CHUNK) {
            let r = self.call(wire::FXP_WRITE, |r| {
                r.bytes(&h.bytes).u64(offset).bytes(chunk)
            })?;
            self.status(r)?;
            offset += chunk.len() as u64;
        }
        Ok(())
    }

    /// Reads the whole file; an error once it holds more than `limit` bytes.
    pub fn read_to_end(&mut self, h: &Handle, limit: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let offset = out.len() as u64;
            let r = self.call(wire::FXP_READ, |r| {
                r.bytes(&h.bytes).u64(offset).u32(CHUNK as u32)
            })?;
            match r {
                Reply::Data { data, .. } => {
                    if data.is_empty() {
                        return Err(
                            self.fail(protocol("sftp server answered a read with no data".into()))
                        );
                    }
                    if out.len() + data.len() > limit {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("remote file is larger than {limit} bytes"),
                        ));
                    }
                    out.extend_from_slice(&data);
                }
                Reply::Status {
                    code: wire::FX_EOF, ..
                } => return Ok(out),
                other => {
                    return Err(self.status(other).err().unwrap_or_else(|| {
                        protocol("sftp server answered a read with ok".into())
                    }));
                }
            }
        }
    }

    /// `fsync@openssh.com` on an open handle: the data is on the server's
    /// disk when this returns.
    pub fn fsync(&mut self, h: &Handle) -> io::Result<()> {
        if !self.has(EXT_FSYNC) {
            return Err(unsupported(EXT_FSYNC));
        }
        let r = self.call(wire::FXP_EXTENDED, |r| {
            r.bytes(EXT_FSYNC.as_bytes()).bytes(&h.bytes)
        })?;
        self.status(r)
    }

    /// Closes a handle.
    pub fn close(&mut self, h: Handle) -> io::Result<()> {
        let r = self.call(wire::FXP_CLOSE, |r| r.bytes(&h.bytes))?;
        self.status(r)
    }

    /// Makes the entries of `dir` durable: opens the directory itself with
    /// a read-only `SSH_FXP_OPEN` (OpenSSH's `sftp-server` calls
    /// `open(dir, O_RDONLY)`, which Linux allows for a directory, and gives
    /// a file handle) and sends `fsync@openssh.com` on it. `Unsupported`
    /// when the server lacks the extension, refuses to open a directory
    /// that way, or refuses to fsync it.
    pub fn fsync_dir(&mut self, dir: &Path) -> io::Result<()> {
        if !self.has(EXT_FSYNC) {
            return Err(unsupported(EXT_FSYNC));
        }
        let h = match self.open_read(dir) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::Other && self.broken.is_none() => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the sftp server cannot open a directory to fsync it ({e})"),
                ));
            }
            Err(e) => return Err(e),
        };
        let synced = self.fsync(&h);
        let closed = self.close(h);
        match synced {
            Err(e) if e.kind() == io::ErrorKind::Other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the sftp server cannot fsync a directory ({e})"),
            )),
            Err(e) => Err(e),
            Ok(()) => closed,
        }
    }

    /// Renames `from` over `to` atomically (`posix-rename@openssh.com`,
    /// i.e. `rename(2)`). Never falls back to `SSH_FXP_RENAME`, which
    /// refuses an existing `to` and is a link-then-unlink on OpenSSH:
    /// `Unsupported` without the extension.
    pub fn posix_rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        if !self.has(EXT_POSIX_RENAME) {
            return Err(unsupported(EXT_POSIX_RENAME));
        }
        let r = self.call(wire::FXP_EXTENDED, |r| {
            r.bytes(EXT_POSIX_RENAME.as_bytes())
                .bytes(path_bytes(from))
                .bytes(path_bytes(to))
        })?;
        self.status(r)
    }

    /// A hard link `to` of `from` (`hardlink@openssh.com`, i.e. `link(2)`).
    pub fn hardlink(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        if !self.has(EXT_HARDLINK) {
            return Err(unsupported(EXT_HARDLINK));
        }
        let r = self.call(wire::FXP_EXTENDED, |r| {
            r.bytes(EXT_HARDLINK.as_bytes())
                .bytes(path_bytes(from))
                .bytes(path_bytes(to))
        })?;
        self.status(r)
    }

    /// Removes a file (or symlink).
    pub fn remove(&mut self, p: &Path) -> io::Result<()> {
        let r = self.call(wire::FXP_REMOVE, |r| r.bytes(path_bytes(p)))?;
        self.status(r)
    }

    /// Creates a directory with permissions `mode` (narrowed by the
    /// server's umask).
    pub fn mkdir(&mut self, p: &Path, mode: u32) -> io::Result<()> {
        let r = self.call(wire::FXP_MKDIR, |r| {
            r.bytes(path_bytes(p)).attrs(None, Some(mode & 0o7777))
        })?;
        self.status(r)
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, p: &Path) -> io::Result<()> {
        let r = self.call(wire::FXP_RMDIR, |r| r.bytes(path_bytes(p)))?;
        self.status(r)
    }

    /// The entries of a directory with their attributes (as `lstat`), `.`
    /// and `..` left out; at most [`MAX_DIR_ENTRIES`].
    pub fn read_dir(&mut self, p: &Path) -> io::Result<Vec<(OsString, Attrs)>> {
        let r = self.call(wire::FXP_OPENDIR, |r| r.bytes(path_bytes(p)))?;
        let h = self.handle(r)?;
        let mut out = Vec::new();
        let result = loop {
            let r = match self.call(wire::FXP_READDIR, |r| r.bytes(&h.bytes)) {
                Ok(r) => r,
                Err(e) => break Err(e),
            };
            match r {
                Reply::Name { entries, .. } => {
                    for (name, attrs) in entries {
                        if name != b"." && name != b".." {
                            out.push((OsString::from_vec(name), attrs));
                        }
                    }
                    if out.len() > MAX_DIR_ENTRIES {
                        break Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("remote directory has more than {MAX_DIR_ENTRIES} entries"),
                        ));
                    }
                }
                Reply::Status {
                    code: wire::FX_EOF, ..
                } => break Ok(()),
                other => {
                    break Err(self.status(other).err().unwrap_or_else(|| {
                        protocol("sftp server answered readdir with ok".into())
                    }));
                }
            }
        };
        if self.broken.is_none() {
            let closed = self.close(h);
            result?;
            closed?;
        } else {
            result?;
        }
        Ok(out)
    }

    /// What the symlink `p` points to.
    pub fn read_link(&mut self, p: &Path) -> io::Result<PathBuf> {
        let r = self.call(wire::FXP_READLINK, |r| r.bytes(path_bytes(p)))?;
        match r {
            Reply::Name { mut entries, .. } if entries.len() == 1 => {
                let (name, _) = entries.remove(0);
                Ok(PathBuf::from(OsString::from_vec(name)))
            }
            Reply::Status { code, message, .. } => Err(status_error(code, &message)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Creates the symlink `link` pointing to `target`. The draft orders
    /// the request's paths (linkpath, targetpath), but OpenSSH's server
    /// reads them the other way round (`symlink(first, second)`) and every
    /// server that announces `@openssh.com` extensions follows it; others
    /// get the draft's order.
    pub fn symlink(&mut self, target: &Path, link: &Path) -> io::Result<()> {
        let openssh = self
            .extensions
            .iter()
            .any(|(n, _)| n.ends_with("@openssh.com"));
        let (first, second) = if openssh {
            (target, link)
        } else {
            (link, target)
        };
        let r = self.call(wire::FXP_SYMLINK, |r| {
            r.bytes(path_bytes(first)).bytes(path_bytes(second))
        })?;
        self.status(r)
    }
}

impl Drop for Sftp {
    fn drop(&mut self) {
        // Closing the server's input ends the subsystem; the local ssh then
        // exits. It is killed if it has not within a moment.
        self.to_writer = None;
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_millis(500);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() >= deadline => break,
                    Ok(None) => thread::sleep(Duration::from_millis(10)),
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    /// A fake server: answers init with `version`, then runs `serve` on
    /// each request body (type byte onward); `None` means stall.
    fn fake(
        extensions: &[(&str, &str)],
        mut serve: impl FnMut(&[u8]) -> Option<Vec<u8>> + Send + 'static,
        timeout: Duration,
    ) -> io::Result<Sftp> {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut version = Request::new(wire::FXP_VERSION, None).u32(3);
        for (n, d) in extensions {
            version = version.bytes(n.as_bytes()).bytes(d.as_bytes());
        }
        let version = version.finish();
        thread::spawn(move || {
            let Ok(init) = wire::read_packet(&mut server) else {
                return;
            };
            assert_eq!(init, [wire::FXP_INIT, 0, 0, 0, 3]);
            server.write_all(&version).unwrap();
            while let Ok(req) = wire::read_packet(&mut server) {
                match serve(&req) {
                    Some(reply) => {
                        if server.write_all(&reply).is_err() {
                            return;
                        }
                    }
                    None => thread::sleep(Duration::from_secs(60)),
                }
            }
        });
        let reader = client.try_clone().unwrap();
        Sftp::over_pipes(reader, client, timeout)
    }

    fn id_of(req: &[u8]) -> u32 {
        u32::from_be_bytes([req[1], req[2], req[3], req[4]])
    }

    fn status(id: u32, code: u32, msg: &str) -> Vec<u8> {
        Request::new(wire::FXP_STATUS, Some(id))
            .u32(code)
            .bytes(msg.as_bytes())
            .bytes(b"")
            .finish()
    }

    #[test]
    fn a_stalled_server_times_out_and_the_channel_is_then_unusable() {
        let mut sftp = fake(&[], |_| None, Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let e = sftp.lstat(Path::new("/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let e = sftp.lstat(Path::new("/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    #[test]
    fn a_silent_server_times_out_the_handshake() {
        let (client, _server) = UnixStream::pair().unwrap();
        let reader = client.try_clone().unwrap();
        let e = Sftp::over_pipes(reader, client, Duration::from_millis(100))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn hostile_replies_are_errors() {
        // A length far over the bound.
        let mut sftp = fake(
            &[],
            |_| Some(vec![0x7f, 0xff, 0xff, 0xff, wire::FXP_STATUS]),
            Duration::from_secs(5),
        )
        .unwrap();
        let e = sftp.lstat(Path::new("/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // An answer to another request.
        let mut sftp = fake(
            &[],
            |req| Some(status(id_of(req) + 1, wire::FX_OK, "")),
            Duration::from_secs(5),
        )
        .unwrap();
        let e = sftp.remove(Path::new("/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // A message with terminal escapes is shown escaped.
        let mut sftp = fake(
            &[],
            |req| Some(status(id_of(req), wire::FX_FAILURE, "\u{1b}[2Jboom\n")),
            Duration::from_secs(5),
        )
        .unwrap();
        let e = sftp.remove(Path::new("/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Other);
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
        assert!(e.to_string().contains("boom"), "{e}");
    }

    #[test]
    fn status_codes_map_to_error_kinds() {
        let mut sftp = fake(
            &[],
            |req| {
                let path_len = u32::from_be_bytes([req[5], req[6], req[7], req[8]]) as usize;
                let code = match &req[9..9 + path_len] {
                    b"/missing" => wire::FX_NO_SUCH_FILE,
                    b"/denied" => wire::FX_PERMISSION_DENIED,
                    b"/unsupported" => wire::FX_OP_UNSUPPORTED,
                    _ => wire::FX_FAILURE,
                };
                Some(status(id_of(req), code, ""))
            },
            Duration::from_secs(5),
        )
        .unwrap();
        for (p, kind) in [
            ("/missing", io::ErrorKind::NotFound),
            ("/denied", io::ErrorKind::PermissionDenied),
            ("/unsupported", io::ErrorKind::Unsupported),
            ("/other", io::ErrorKind::Other),
        ] {
            assert_eq!(sftp.remove(Path::new(p)).unwrap_err().kind(), kind, "{p}");
        }
    }

    #[test]
    fn missing_extensions_are_unsupported_and_nothing_is_sent() {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = std::sync::Arc::clone(&sent);
        let mut sftp = fake(
            &[],
            move |req| {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Some(status(id_of(req), wire::FX_OK, ""))
            },
            Duration::from_secs(5),
        )
        .unwrap();
        let (a, b) = (Path::new("/a"), Path::new("/b"));
        for e in [
            sftp.posix_rename(a, b).unwrap_err(),
            sftp.hardlink(a, b).unwrap_err(),
            sftp.fsync_dir(a).unwrap_err(),
            sftp.fsync(&Handle { bytes: vec![1] }).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
        }
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn symlink_order_follows_the_server() {
        let order = |exts: &[(&str, &str)]| {
            let (tx, rx) = mpsc::channel();
            let mut sftp = fake(
                exts,
                move |req| {
                    let _ = tx.send(req.to_vec());
                    Some(status(id_of(req), wire::FX_OK, ""))
                },
                Duration::from_secs(5),
            )
            .unwrap();
            sftp.symlink(Path::new("T"), Path::new("L")).unwrap();
            let req = rx.recv().unwrap();
            (req[9], req[14])
        };
        assert_eq!(order(&[(EXT_FSYNC, "1")]), (b'T', b'L'));
        assert_eq!(order(&[]), (b'L', b'T'));
    }
}
