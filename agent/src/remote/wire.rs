//! The SFTP version 3 wire format (draft-ietf-secsh-filexfer-02, the
//! version OpenSSH speaks) plus the OpenSSH extensions the agent uses:
//! building requests and decoding what the server sends back.
//!
//! Everything read from the server is untrusted: a packet longer than
//! [`MAX_PACKET`] is refused before anything is allocated for it, every
//! length inside a packet is checked against what is left of it, and a
//! truncated or lying packet is an error, never a panic.

use std::io::{self, Read};

/// The largest packet accepted from the server (OpenSSH sends at most
/// 256 KiB, `SFTP_MAX_MSG_LENGTH`).
pub const MAX_PACKET: usize = 256 * 1024;
/// The largest handle accepted (the draft: at most 256 bytes).
pub const MAX_HANDLE: usize = 256;

pub const FXP_INIT: u8 = 1;
pub const FXP_VERSION: u8 = 2;
pub const FXP_OPEN: u8 = 3;
pub const FXP_CLOSE: u8 = 4;
pub const FXP_READ: u8 = 5;
pub const FXP_WRITE: u8 = 6;
pub const FXP_LSTAT: u8 = 7;
pub const FXP_FSETSTAT: u8 = 10;
pub const FXP_OPENDIR: u8 = 11;
pub const FXP_READDIR: u8 = 12;
pub const FXP_REMOVE: u8 = 13;
pub const FXP_MKDIR: u8 = 14;
pub const FXP_RMDIR: u8 = 15;
pub const FXP_STAT: u8 = 17;
pub const FXP_READLINK: u8 = 19;
pub const FXP_SYMLINK: u8 = 20;
pub const FXP_STATUS: u8 = 101;
pub const FXP_HANDLE: u8 = 102;
pub const FXP_DATA: u8 = 103;
pub const FXP_NAME: u8 = 104;
pub const FXP_ATTRS: u8 = 105;
pub const FXP_EXTENDED: u8 = 200;
pub const FXP_EXTENDED_REPLY: u8 = 201;

pub const FXF_READ: u32 = 0x01;
pub const FXF_WRITE: u32 = 0x02;
pub const FXF_CREAT: u32 = 0x08;
pub const FXF_EXCL: u32 = 0x20;

pub const ATTR_SIZE: u32 = 0x01;
pub const ATTR_UIDGID: u32 = 0x02;
pub const ATTR_PERMISSIONS: u32 = 0x04;
pub const ATTR_ACMODTIME: u32 = 0x08;
pub const ATTR_EXTENDED: u32 = 0x8000_0000;

pub const FX_OK: u32 = 0;
pub const FX_EOF: u32 = 1;
pub const FX_NO_SUCH_FILE: u32 = 2;
pub const FX_PERMISSION_DENIED: u32 = 3;
pub const FX_FAILURE: u32 = 4;
pub const FX_BAD_MESSAGE: u32 = 5;
pub const FX_OP_UNSUPPORTED: u32 = 8;

/// A file's attributes as the server reports them (fields it leaves out
/// are 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// The full `st_mode`, file type bits included.
    pub mode: u32,
    pub mtime: u32,
}

const S_IFMT: u32 = 0o170_000;

impl Attrs {
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == 0o100_000
    }
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == 0o040_000
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == 0o120_000
    }
    /// The permission bits (`& 0o7777`).
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// A request being built: `uint32 length`, `byte type`, then the fields.
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    /// A request of type `kind`; `id` is written when given (every request
    /// but `SSH_FXP_INIT` carries one).
    pub fn new(kind: u8, id: Option<u32>) -> Request {
        let mut buf = vec![0, 0, 0, 0, kind];
        if let Some(id) = id {
            buf.extend_from_slice(&id.to_be_bytes());
        }
        Request { buf }
    }
    pub fn u32(mut self, v: u32) -> Request {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Request {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// An SFTP string: `uint32 length` then the bytes.
    pub fn bytes(mut self, v: &[u8]) -> Request {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(v);
        self
    }
    /// Attributes with only the given fields set.
    pub fn attrs(self, uid_gid: Option<(u32, u32)>, perm: Option<u32>) -> Request {
        let mut flags = 0;
        if uid_gid.is_some() {
            flags |= ATTR_UIDGID;
        }
        if perm.is_some() {
            flags |= ATTR_PERMISSIONS;
        }
        let mut r = self.u32(flags);
        if let Some((uid, gid)) = uid_gid {
            r = r.u32(uid).u32(gid);
        }
        if let Some(perm) = perm {
            r = r.u32(perm);
        }
        r
    }
    /// The finished packet with its length filled in.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len() - 4).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_be_bytes());
        self.buf
    }
}

/// A decoding error: what was wrong with the server's packet.
fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("sftp server sent a malformed packet: {what}"),
    )
}

/// A cursor over a packet's bytes; every read checks what is left.
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { rest: bytes }
    }
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
    fn take(&mut self, n: usize, what: &str) -> io::Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(bad(&format!("{what} truncated")));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    pub fn u8(&mut self, what: &str) -> io::Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u32(&mut self, what: &str) -> io::Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self, what: &str) -> io::Result<u64> {
        let hi = u64::from(self.u32(what)?);
        let lo = u64::from(self.u32(what)?);
        Ok(hi << 32 | lo)
    }
    /// An SFTP string; its length must fit in what is left.
    pub fn bytes(&mut self, what: &str) -> io::Result<&'a [u8]> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }
    /// An SFTP string that may be missing at the end of the packet (the
    /// status message and language of old servers).
    pub fn opt_string(&mut self, what: &str) -> io::Result<String> {
        if self.rest.is_empty() {
            return Ok(String::new());
        }
        Ok(String::from_utf8_lossy(self.bytes(what)?).into_owned())
    }
    pub fn attrs(&mut self) -> io::Result<Attrs> {
        let flags = self.u32("attribute flags")?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = self.u64("size")?;
        }
        if flags & ATTR_UIDGID != 0 {
            a.uid = self.u32("uid")?;
            a.gid = self.u32("gid")?;
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.mode = self.u32("permissions")?;
        }
        if flags & ATTR_ACMODTIME != 0 {
            let _atime = self.u32("atime")?;
            a.mtime = self.u32("mtime")?;
        }
        if flags & ATTR_EXTENDED != 0 {
            let count = self.u32("extended count")?;
            for _ in 0..count {
                // Each pair takes at least 8 bytes: a lying count runs out
                // of packet, it does not loop for long.
                self.bytes("extended type")?;
                self.bytes("extended data")?;
            }
        }
        Ok(a)
    }
}

/// One reply of the server, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Version {
        version: u32,
        extensions: Vec<(String, String)>,
    },
    Status {
        id: u32,
        code: u32,
        message: String,
    },
    Handle {
        id: u32,
        handle: Vec<u8>,
    },
    Data {
        id: u32,
        data: Vec<u8>,
    },
    Name {
        id: u32,
        entries: Vec<(Vec<u8>, Attrs)>,
    },
    Attrs {
        id: u32,
        attrs: Attrs,
    },
    Extended {
        id: u32,
    },
}

impl Reply {
    /// The request id the reply answers (none for `SSH_FXP_VERSION`).
    pub fn id(&self) -> Option<u32> {
        match self {
            Reply::Version { .. } => None,
            Reply::Status { id, .. }
            | Reply::Handle { id, .. }
            | Reply::Data { id, .. }
            | Reply::Name { id, .. }
            | Reply::Attrs { id, .. }
            | Reply::Extended { id } => Some(*id),
        }
    }
}

/// Decodes one packet's body (type byte onward, without the length).
pub fn decode(body: &[u8]) -> io::Result<Reply> {
    let mut c = Cursor::new(body);
    let kind = c.u8("packet type")?;
    if kind == FXP_VERSION {
        let version = c.u32("version")?;
        let mut extensions = Vec::new();
        while !c.is_empty() {
            let name = String::from_utf8_lossy(c.bytes("extension name")?).into_owned();
            let data = String::from_utf8_lossy(c.bytes("extension data")?).into_owned();
            extensions.push((name, data));
        }
        return Ok(Reply::Version {
            version,
            extensions,
        });
    }
    let id = c.u32("request id")?;
    let reply = match kind {
        FXP_STATUS => {
            let code = c.u32("status code")?;
            let message = c.opt_string("status message")?;
            Reply::Status { id, code, message }
        }
        FXP_HANDLE => {
            let handle = c.bytes("handle")?;
            if handle.len() > MAX_HANDLE {
                return Err(bad("handle longer than 256 bytes"));
            }
            Reply::Handle {
                id,
                handle: handle.to_vec(),
            }
        }
        FXP_DATA => Reply::Data {
            id,
            data: c.bytes("data")?.to_vec(),
        },
        FXP_NAME => {
            let count = c.u32("name count")?;
            // A name takes at least 12 bytes: the count cannot make us
            // reserve more than the packet holds.
            let mut entries = Vec::with_capacity((count as usize).min(body.len() / 12));
            for _ in 0..count {
                let name = c.bytes("file name")?.to_vec();
                let _long = c.bytes("long name")?;
                let attrs = c.attrs()?;
                entries.push((name, attrs));
            }
            Reply::Name { id, entries }
        }
        FXP_ATTRS => Reply::Attrs {
            id,
            attrs: c.attrs()?,
        },
        FXP_EXTENDED_REPLY => Reply::Extended { id },
        other => return Err(bad(&format!("unknown packet type {other}"))),
    };
    Ok(reply)
}

/// Reads one packet's body from `r`: the length is checked against
/// [`MAX_PACKET`] before anything is allocated for it.
pub fn read_packet(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(bad("empty packet"));
    }
    if len > MAX_PACKET {
        return Err(bad(&format!(
            "packet of {len} bytes (more than {MAX_PACKET})"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding() {
        let p = Request::new(FXP_OPEN, Some(7))
            .bytes(b"/a")
            .u32(FXF_WRITE | FXF_CREAT | FXF_EXCL)
            .attrs(None, Some(0o640))
            .finish();
        assert_eq!(
            p,
            [
                0, 0, 0, 23, FXP_OPEN, 0, 0, 0, 7, 0, 0, 0, 2, b'/', b'a', 0, 0, 0, 0x2a, 0, 0, 0,
                4, 0, 0, 1, 0xa0
            ]
        );
        let init = Request::new(FXP_INIT, None).u32(3).finish();
        assert_eq!(init, [0, 0, 0, 5, FXP_INIT, 0, 0, 0, 3]);
        let attrs = Request::new(FXP_FSETSTAT, Some(1))
            .attrs(Some((5, 6)), Some(0o600))
            .finish();
        assert_eq!(
            &attrs[9..13],
            &(ATTR_UIDGID | ATTR_PERMISSIONS).to_be_bytes()
        );
        assert_eq!(attrs.len(), 4 + 1 + 4 + 4 + 12);
    }

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn decodes_replies() {
        let v = body(&[
            &[FXP_VERSION],
            &3u32.to_be_bytes(),
            &4u32.to_be_bytes(),
            b"a@b",
            &1u32.to_be_bytes(),
            b"1",
        ]);
        // "a@b" is 3 bytes but says 4: truncated data string.
        assert!(decode(&v).is_err());
        let v = body(&[
            &[FXP_VERSION],
            &3u32.to_be_bytes(),
            &3u32.to_be_bytes(),
            b"a@b",
            &1u32.to_be_bytes(),
            b"1",
        ]);
        assert_eq!(
            decode(&v).unwrap(),
            Reply::Version {
                version: 3,
                extensions: vec![("a@b".into(), "1".into())]
            }
        );
        // A status without message and language (old servers).
        let s = body(&[&[FXP_STATUS], &9u32.to_be_bytes(), &2u32.to_be_bytes()]);
        assert_eq!(
            decode(&s).unwrap(),
            Reply::Status {
                id: 9,
                code: 2,
                message: String::new()
            }
        );
        let a = body(&[
            &[FXP_ATTRS],
            &1u32.to_be_bytes(),
            &(ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME).to_be_bytes(),
            &10u64.to_be_bytes(),
            &1u32.to_be_bytes(),
            &2u32.to_be_bytes(),
            &0o100_640u32.to_be_bytes(),
            &100u32.to_be_bytes(),
            &200u32.to_be_bytes(),
        ]);
        let Reply::Attrs { attrs, .. } = decode(&a).unwrap() else {
            panic!()
        };
        assert_eq!(
            attrs,
            Attrs {
                size: 10,
                uid: 1,
                gid: 2,
                mode: 0o100_640,
                mtime: 200
            }
        );
        assert!(attrs.is_file() && !attrs.is_dir() && !attrs.is_symlink());
        assert_eq!(attrs.perm(), 0o640);
        // A name count that lies.
        let n = body(&[&[FXP_NAME], &1u32.to_be_bytes(), &u32::MAX.to_be_bytes()]);
        assert!(decode(&n).is_err());
        // An oversized handle.
        let h = body(&[
            &[FXP_HANDLE],
            &1u32.to_be_bytes(),
            &300u32.to_be_bytes(),
            &[0; 300],
        ]);
        assert!(decode(&h).is_err());
        assert!(decode(&[77, 0, 0, 0, 1]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn packet_length_is_bounded_before_allocation() {
        let huge = [0x7f, 0xff, 0xff, 0xff, 1];
        let e = read_packet(&mut &huge[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("more than"), "{e}");
        let short = [0, 0, 0, 9, 1, 2];
        assert_eq!(
            read_packet(&mut &short[..]).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let ok = [0, 0, 0, 2, 1, 2];
        assert_eq!(read_packet(&mut &ok[..]).unwrap(), vec![1, 2]);
    }
}

#[cfg(test)]
mod fuzz {
    //! Hostile replies: random bytes, valid packets with lying lengths,
    //! truncated packets. Decoding never panics, and a truncated valid
    //! packet is an error.

    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    use super::*;

    #[test]
    fn random_bytes_never_panic() {
        let mut runner = TestRunner::new(crate::fuzzing::config(1024));
        runner
            .run(&proptest::collection::vec(any::<u8>(), 0..200), |bytes| {
                let _ = decode(&bytes);
                let _ = read_packet(&mut &bytes[..]);
                Ok(())
            })
            .unwrap();
    }

    fn name_packet(names: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![FXP_NAME];
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&u32::try_from(names.len()).unwrap().to_be_bytes());
        for n in names {
            b.extend_from_slice(&u32::try_from(n.len()).unwrap().to_be_bytes());
            b.extend_from_slice(n);
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&ATTR_PERMISSIONS.to_be_bytes());
            b.extend_from_slice(&0o100_644u32.to_be_bytes());
        }
        b
    }

    #[test]
    fn lying_and_truncated_packets_are_errors() {
        let mut runner = TestRunner::new(crate::fuzzing::config(512));
        let names = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..6);
        runner
            .run(
                &(names, any::<usize>(), any::<u32>(), any::<usize>()),
                |(names, cut, lie, at)| {
                    let good = name_packet(&names);
                    let Reply::Name { entries, .. } = decode(&good).unwrap() else {
                        panic!("not a name")
                    };
                    prop_assert_eq!(entries.len(), names.len());
                    // Every strict prefix is incomplete: an error.
                    let cut = cut % good.len();
                    prop_assert!(decode(&good[..cut]).is_err());
                    // A length field overwritten with a lie: no panic, and
                    // the result never holds more than the packet did.
                    let mut lying = good.clone();
                    let at = 1 + at % (lying.len().saturating_sub(4).max(1));
                    if at + 4 <= lying.len() {
                        lying[at..at + 4].copy_from_slice(&lie.to_be_bytes());
                    }
                    if let Ok(Reply::Name { entries, .. }) = decode(&lying) {
                        let total: usize = entries.iter().map(|(n, _)| n.len()).sum();
                        prop_assert!(total <= lying.len());
                    }
                    // Framed with a lying outer length.
                    let mut framed = lie.to_be_bytes().to_vec();
                    framed.extend_from_slice(&good);
                    if let Ok(b) = read_packet(&mut &framed[..]) {
                        prop_assert!(b.len() == lie as usize && b.len() <= good.len());
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
}
