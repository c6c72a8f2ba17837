//! The client API of writers (and, later, replicas): transactions of puts and
//! deletes, and gets. Frames are `len u32 | kind u8 | id u64 | body`; a client
//! pipelines requests on one stream and matches replies by `id`, which come
//! back in completion order.
//!
//! ```text
//! Txn:       count u32 | op*          op: 1 u8 | key_len u16 | key | value_len u32 | value   (put)
//!                                         2 u8 | key_len u16 | key                          (delete)
//! Get:       key_len u16 | key | min_lsn u64
//! Follow:    reads u8 (0 or 1) | read_point u64
//! Role:      (empty)
//! Promote:   (empty)
//! Committed: commit_lsn u64
//! Value:     read_lsn u64 | found u8 | value_len u32 | value
//! Error:     code u8 | message_len u32 | message
//! Progress:  epoch u64 | truncated_above u64 | vdl u64 | pg_count u32 | pgcl u64 * pg_count
//! RoleIs:    state u8 (0 replica, 1 writer, 2 promoting) | epoch u64 | vdl u64 | priority u32 | writer_silent_ms u64
//! Promoted:  epoch u64 | vdl u64 | claim_us u64 | offer_us u64 | decide_us u64 | truncate_us u64 | total_us u64
//! ```
//!
//! `Follow` turns its stream into a feed (a reader, such as a replica, names its
//! read point, and sends `Follow` again on the same stream as it moves: the
//! writer keeps the GC horizon below it): the server answers with a `Progress`
//! frame (same id) whenever its read point advances, and at least every
//! heartbeat interval, until the stream closes. Replicas follow the writer's
//! VDL this way (its silence is how they detect a dead writer); tools follow a
//! replica's. `Role` tells a client or a peer replica who is the writer;
//! `Promote` (an admin call to a replica) makes it take over the volume.
//!
//! Decoding checks only the framing; `Request::check` applies the key, value
//! and transaction limits so that a client gets an `Invalid` error naming the
//! limit instead of a closed stream.

use thiserror::Error;

use crate::codec::{put_u32, put_u64, DecodeError, Reader};
use crate::ids::{Epoch, Lsn};
use crate::page::{OpError, PageOp};

/// Operations one transaction may carry.
pub const TXN_OPS_MAX: usize = 1024;
/// Default ceiling on one request frame.
pub const REQUEST_BYTES_MAX: usize = 4 << 20;
const MESSAGE_BYTES_MAX: usize = 4096;

const KIND_TXN: u8 = 1;
const KIND_GET: u8 = 2;
const KIND_COMMITTED: u8 = 3;
const KIND_VALUE: u8 = 4;
const KIND_ERROR: u8 = 5;
const KIND_FOLLOW: u8 = 6;
const KIND_PROGRESS: u8 = 7;
const KIND_ROLE: u8 = 8;
const KIND_PROMOTE: u8 = 9;
const KIND_ROLE_IS: u8 = 10;
const KIND_PROMOTED: u8 = 11;
/// Protection groups a `Progress` frame may list.
const PROGRESS_PGS_MAX: usize = 1 << 16;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ApiErrorCode {
    /// The frame does not decode (unknown request or operation, bad lengths); the stream is closed.
    Malformed = 1,
    /// The frame exceeds the server's request limit; the stream is closed.
    TooLarge = 2,
    /// The request breaks a limit (key or value size, operations per transaction); nothing was written.
    Invalid = 3,
    /// The server cannot take writes now (shutting down, or fenced by a newer writer).
    Unavailable = 4,
    /// A replica's read point did not reach the requested `min_lsn` in time; retry, or read from the writer.
    Timeout = 5,
}

impl ApiErrorCode {
    fn from_u8(v: u8, offset: usize) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => ApiErrorCode::Malformed,
            2 => ApiErrorCode::TooLarge,
            3 => ApiErrorCode::Invalid,
            4 => ApiErrorCode::Unavailable,
            5 => ApiErrorCode::Timeout,
            _ => return Err(DecodeError::Invalid { what: "api error code", offset, value: v as u64 }),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Applies every operation atomically; answered with `Committed`.
    Txn(Vec<PageOp>),
    /// Answered with `Value` read at a durable LSN >= `min_lsn` (read-your-writes: pass a
    /// commit LSN; a replica waits until it has applied that far).
    Get { key: Vec<u8>, min_lsn: Lsn },
    /// Answered with a `Progress` frame now and at every advance, until the stream closes.
    /// `read_point`: where the follower reads (a replica), which the writer's GC horizon
    /// stays at or below; `None` for followers that read nothing (tools).
    Follow { read_point: Option<Lsn> },
    /// Answered with `RoleIs`: whether this server is the writer, and how far it is.
    Role,
    /// Admin, to a replica: take over the volume now; answered with `Promoted` once it accepts writes.
    Promote,
}

/// A server's read point: everything at or below `vdl` is durable and visible.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The epoch of the writer this comes from: a new one means a recovery
    /// truncated the log above `truncated_above` (the VDL that writer started from).
    pub epoch: Epoch,
    pub truncated_above: Lsn,
    pub vdl: Lsn,
    /// From a writer, per PG, its PGCL: at or above every record of that PG at or below
    /// `vdl`, so a segment whose SCL reaches `min(pgcl, vdl)` holds all of them. Empty from a replica.
    pub pgcl: Vec<Lsn>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The transaction is durable (VDL >= `commit_lsn`).
    Committed {
        commit_lsn: Lsn,
    },
    /// The key's value as of `read_lsn`, which is durable.
    Value {
        read_lsn: Lsn,
        value: Option<Vec<u8>>,
    },
    Error {
        code: ApiErrorCode,
        message: String,
    },
    Progress(Progress),
    RoleIs(Role),
    Promoted(Promoted),
}

/// Who a server is: the writer (of `epoch`) or a replica following it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Role {
    pub writer: bool,
    /// A replica taking over the volume (claim, recovery, truncation): the writer-to-be.
    pub promoting: bool,
    pub epoch: Epoch,
    /// A writer's VDL, a replica's read point.
    pub vdl: Lsn,
    /// A replica's promotion priority (higher wins among equal read points).
    pub priority: u32,
    /// How long a replica has not heard from the writer (0 for a writer).
    pub writer_silent_ms: u64,
}

/// A promotion that finished: the replica is the writer of `epoch` from `vdl` on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Promoted {
    pub epoch: Epoch,
    pub vdl: Lsn,
    pub claim_us: u64,
    pub offer_us: u64,
    pub decide_us: u64,
    pub truncate_us: u64,
    pub total_us: u64,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("{0}")]
    Op(#[from] OpError),
    #[error("a transaction needs at least one operation")]
    EmptyTxn,
    #[error("transaction of {0} operations exceeds {TXN_OPS_MAX}")]
    TooManyOps(usize),
}

fn frame(out: &mut Vec<u8>, kind: u8, id: u64, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    put_u32(out, 0);
    out.push(kind);
    put_u64(out, id);
    body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_key(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
}

fn key(r: &mut Reader) -> Result<Vec<u8>, DecodeError> {
    let n = u16::from_le_bytes(r.bytes(2)?.try_into().expect("2 bytes")) as usize;
    Ok(r.bytes(n)?.to_vec())
}

fn value(r: &mut Reader) -> Result<Vec<u8>, DecodeError> {
    let n = r.len("value length", usize::MAX)?;
    Ok(r.bytes(n)?.to_vec())
}

impl Request {
    /// Checks the limits of the engine; a request that fails is refused whole.
    pub fn check(&self) -> Result<(), RequestError> {
        match self {
            Request::Txn(ops) if ops.is_empty() => Err(RequestError::EmptyTxn),
            Request::Txn(ops) if ops.len() > TXN_OPS_MAX => Err(RequestError::TooManyOps(ops.len())),
            Request::Txn(ops) => ops.iter().try_for_each(|op| op.check().map_err(RequestError::from)),
            Request::Get { key, .. } => PageOp::Delete { key: key.clone() }.check().map_err(RequestError::from),
            Request::Follow { .. } | Request::Role | Request::Promote => Ok(()),
        }
    }

    /// Whether the request can be framed at all (key lengths are u16 on the wire);
    /// `check` is stricter.
    pub fn encodable(&self) -> bool {
        let key_fits = |k: &[u8]| k.len() <= u16::MAX as usize;
        match self {
            Request::Txn(ops) => ops.iter().all(|op| key_fits(op.key())),
            Request::Get { key, .. } => key_fits(key),
            Request::Follow { .. } | Request::Role | Request::Promote => true,
        }
    }

    /// Appends the frame for request `id`; the request must be `encodable`.
    pub fn encode(&self, id: u64, out: &mut Vec<u8>) {
        assert!(self.encodable(), "a key longer than {} bytes cannot be framed", u16::MAX);
        match self {
            Request::Txn(ops) => frame(out, KIND_TXN, id, |out| {
                put_u32(out, ops.len() as u32);
                for op in ops {
                    match op {
                        PageOp::Put { key, value } => {
                            out.push(OP_PUT);
                            put_key(out, key);
                            put_u32(out, value.len() as u32);
                            out.extend_from_slice(value);
                        }
                        PageOp::Delete { key } => {
                            out.push(OP_DELETE);
                            put_key(out, key);
                        }
                    }
                }
            }),
            Request::Get { key, min_lsn } => frame(out, KIND_GET, id, |out| {
                put_key(out, key);
                put_u64(out, min_lsn.0);
            }),
            Request::Follow { read_point } => frame(out, KIND_FOLLOW, id, |out| {
                out.push(read_point.is_some() as u8);
                put_u64(out, read_point.unwrap_or_default().0);
            }),
            Request::Role => frame(out, KIND_ROLE, id, |_| {}),
            Request::Promote => frame(out, KIND_PROMOTE, id, |_| {}),
        }
    }

    /// Decodes a frame body (`kind | id | body`) into `(id, request)`.
    pub fn decode(body: &[u8]) -> Result<(u64, Request), DecodeError> {
        let mut r = Reader::new(body);
        let kind = r.u8()?;
        let id = r.u64()?;
        let req = match kind {
            KIND_TXN => {
                let at = r.pos();
                let n = r.u32()? as usize;
                // Each operation takes at least 3 bytes: a count beyond that is a lie.
                if n * 3 > r.remaining() {
                    return Err(DecodeError::Invalid { what: "operation count", offset: at, value: n as u64 });
                }
                // Bounded by the limit, not the claim: `check` refuses more operations anyway.
                let mut ops = Vec::with_capacity(n.min(TXN_OPS_MAX));
                for _ in 0..n {
                    let at = r.pos();
                    ops.push(match r.u8()? {
                        OP_PUT => PageOp::Put { key: key(&mut r)?, value: value(&mut r)? },
                        OP_DELETE => PageOp::Delete { key: key(&mut r)? },
                        other => return Err(DecodeError::Invalid { what: "operation", offset: at, value: other as u64 }),
                    });
                }
                Request::Txn(ops)
            }
            KIND_GET => Request::Get { key: key(&mut r)?, min_lsn: Lsn(r.u64()?) },
            KIND_FOLLOW => {
                let (at, reads) = (r.pos(), r.u8()?);
                let lsn = Lsn(r.u64()?);
                let read_point = match reads {
                    0 if lsn == Lsn::ZERO => None,
                    1 => Some(lsn),
                    _ => return Err(DecodeError::Invalid { what: "follow read point", offset: at, value: reads as u64 }),
                };
                Request::Follow { read_point }
            }
            KIND_ROLE => Request::Role,
            KIND_PROMOTE => Request::Promote,
            other => return Err(DecodeError::Invalid { what: "request kind", offset: 0, value: other as u64 }),
        };
        r.finish()?;
        Ok((id, req))
    }
}

impl Response {
    pub fn encode(&self, id: u64, out: &mut Vec<u8>) {
        match self {
            Response::Committed { commit_lsn } => frame(out, KIND_COMMITTED, id, |out| put_u64(out, commit_lsn.0)),
            Response::Value { read_lsn, value } => frame(out, KIND_VALUE, id, |out| {
                put_u64(out, read_lsn.0);
                out.push(value.is_some() as u8);
                let v = value.as_deref().unwrap_or_default();
                put_u32(out, v.len() as u32);
                out.extend_from_slice(v);
            }),
            Response::Error { code, message } => frame(out, KIND_ERROR, id, |out| {
                out.push(*code as u8);
                let mut end = message.len().min(MESSAGE_BYTES_MAX);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                put_u32(out, end as u32);
                out.extend_from_slice(&message.as_bytes()[..end]);
            }),
            Response::Progress(p) => frame(out, KIND_PROGRESS, id, |out| {
                put_u64(out, p.epoch.0);
                put_u64(out, p.truncated_above.0);
                put_u64(out, p.vdl.0);
                put_u32(out, p.pgcl.len() as u32);
                p.pgcl.iter().for_each(|l| put_u64(out, l.0));
            }),
            Response::RoleIs(r) => frame(out, KIND_ROLE_IS, id, |out| {
                out.push(if r.writer {
                    1
                } else if r.promoting {
                    2
                } else {
                    0
                });
                put_u64(out, r.epoch.0);
                put_u64(out, r.vdl.0);
                put_u32(out, r.priority);
                put_u64(out, r.writer_silent_ms);
            }),
            Response::Promoted(p) => frame(out, KIND_PROMOTED, id, |out| {
                for v in [p.epoch.0, p.vdl.0, p.claim_us, p.offer_us, p.decide_us, p.truncate_us, p.total_us] {
                    put_u64(out, v);
                }
            }),
        }
    }

    /// Decodes a frame body into `(id, response)`.
    pub fn decode(body: &[u8]) -> Result<(u64, Response), DecodeError> {
        let mut r = Reader::new(body);
        let kind = r.u8()?;
        let id = r.u64()?;
        let resp = match kind {
            KIND_COMMITTED => Response::Committed { commit_lsn: Lsn(r.u64()?) },
            KIND_VALUE => {
                let read_lsn = Lsn(r.u64()?);
                let at = r.pos();
                let found = r.u8()?;
                let v = value(&mut r)?;
                match found {
                    0 if v.is_empty() => Response::Value { read_lsn, value: None },
                    1 => Response::Value { read_lsn, value: Some(v) },
                    _ => return Err(DecodeError::Invalid { what: "value flag", offset: at, value: found as u64 }),
                }
            }
            KIND_ERROR => {
                let code = ApiErrorCode::from_u8(r.u8()?, r.pos())?;
                let n = r.len("error message length", MESSAGE_BYTES_MAX)?;
                let at = r.pos();
                let message =
                    String::from_utf8(r.bytes(n)?.to_vec()).map_err(|_| DecodeError::Invalid { what: "error message utf-8", offset: at, value: n as u64 })?;
                Response::Error { code, message }
            }
            KIND_PROGRESS => {
                let (epoch, truncated_above, vdl) = (Epoch(r.u64()?), Lsn(r.u64()?), Lsn(r.u64()?));
                let n = r.len("progress pg count", PROGRESS_PGS_MAX)?;
                let pgcl = (0..n).map(|_| r.u64().map(Lsn)).collect::<Result<_, _>>()?;
                Response::Progress(Progress { epoch, truncated_above, vdl, pgcl })
            }
            KIND_ROLE_IS => {
                let at = r.pos();
                let (writer, promoting) = match r.u8()? {
                    0 => (false, false),
                    1 => (true, false),
                    2 => (false, true),
                    v => return Err(DecodeError::Invalid { what: "role state", offset: at, value: v as u64 }),
                };
                Response::RoleIs(Role { writer, promoting, epoch: Epoch(r.u64()?), vdl: Lsn(r.u64()?), priority: r.u32()?, writer_silent_ms: r.u64()? })
            }
            KIND_PROMOTED => {
                let mut v = [0u64; 7];
                for x in &mut v {
                    *x = r.u64()?;
                }
                let [epoch, vdl, claim_us, offer_us, decide_us, truncate_us, total_us] = v;
                Response::Promoted(Promoted { epoch: Epoch(epoch), vdl: Lsn(vdl), claim_us, offer_us, decide_us, truncate_us, total_us })
            }
            other => return Err(DecodeError::Invalid { what: "response kind", offset: 0, value: other as u64 }),
        };
        r.finish()?;
        Ok((id, resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn requests() -> Vec<Request> {
        vec![
            Request::Txn(vec![
                PageOp::Put { key: b"k1".to_vec(), value: b"v".to_vec() },
                PageOp::Delete { key: b"k2".to_vec() },
                PageOp::Put { key: b"k3".to_vec(), value: vec![] },
            ]),
            Request::Get { key: b"key".to_vec(), min_lsn: Lsn(9) },
            Request::Follow { read_point: None },
            Request::Follow { read_point: Some(Lsn(12)) },
            Request::Role,
            Request::Promote,
        ]
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::Committed { commit_lsn: Lsn(42) },
            Response::Value { read_lsn: Lsn(7), value: Some(b"v".to_vec()) },
            Response::Value { read_lsn: Lsn(7), value: Some(vec![]) },
            Response::Value { read_lsn: Lsn(7), value: None },
            Response::Error { code: ApiErrorCode::Invalid, message: "key too long".into() },
            Response::Progress(Progress { epoch: Epoch(3 << 32), truncated_above: Lsn(4), vdl: Lsn(5), pgcl: vec![Lsn(3), Lsn(5)] }),
            Response::RoleIs(Role { writer: true, promoting: false, epoch: Epoch(7), vdl: Lsn(9), priority: 2, writer_silent_ms: 0 }),
            Response::RoleIs(Role { writer: false, promoting: true, epoch: Epoch(7), vdl: Lsn(9), priority: 2, writer_silent_ms: 400 }),
            Response::Promoted(Promoted { epoch: Epoch(8), vdl: Lsn(9), claim_us: 1, offer_us: 2, decide_us: 3, truncate_us: 4, total_us: 11 }),
        ]
    }

    #[test]
    fn round_trips() {
        for (i, req) in requests().into_iter().enumerate() {
            let mut f = Vec::new();
            req.encode(i as u64, &mut f);
            assert_eq!(Request::decode(&f[4..]).unwrap(), (i as u64, req));
        }
        for (i, resp) in responses().into_iter().enumerate() {
            let mut f = Vec::new();
            resp.encode(i as u64, &mut f);
            assert_eq!(Response::decode(&f[4..]).unwrap(), (i as u64, resp));
        }
    }

    /// Request and response kinds, one index each: exhaustive, so a new kind does not compile
    /// until it has an index here (and `KINDS` grows, or `every_kind_is_sampled` indexes out of bounds).
    const KINDS: usize = 11;
    fn request_kind(r: &Request) -> usize {
        match r {
            Request::Txn(_) => 0,
            Request::Get { .. } => 1,
            Request::Follow { .. } => 2,
            Request::Role => 3,
            Request::Promote => 4,
        }
    }
    fn response_kind(r: &Response) -> usize {
        match r {
            Response::Committed { .. } => 5,
            Response::Value { .. } => 6,
            Response::Error { .. } => 7,
            Response::Progress(_) => 8,
            Response::RoleIs(_) => 9,
            Response::Promoted(_) => 10,
        }
    }

    /// Every frame `decoders_are_total` mutates: each request, then each response.
    fn frames() -> Vec<Vec<u8>> {
        let requests = requests().into_iter().map(|r| {
            let mut f = Vec::new();
            r.encode(3, &mut f);
            f
        });
        let responses = responses().into_iter().map(|r| {
            let mut f = Vec::new();
            r.encode(3, &mut f);
            f
        });
        requests.chain(responses).collect()
    }

    /// The samples (which `decoders_are_total` picks from, all of them) have every kind of request and response.
    #[test]
    fn every_kind_is_sampled() {
        let mut sampled = [false; KINDS];
        requests().iter().for_each(|r| sampled[request_kind(r)] = true);
        responses().iter().for_each(|r| sampled[response_kind(r)] = true);
        assert_eq!(sampled.iter().position(|s| !s), None, "a request or response kind without a sample");
        assert_eq!(frames().len(), requests().len() + responses().len());
    }

    #[test]
    fn limits_are_checked_after_decoding() {
        let long = Request::Get { key: vec![b'k'; 2000], min_lsn: Lsn::ZERO };
        let mut f = Vec::new();
        long.encode(1, &mut f);
        let (_, req) = Request::decode(&f[4..]).unwrap();
        assert_eq!(req.check(), Err(RequestError::Op(OpError::KeySize(2000))));
        assert_eq!(Request::Txn(vec![]).check(), Err(RequestError::EmptyTxn));
        let big = Request::Txn(vec![PageOp::Put { key: b"k".to_vec(), value: vec![0; 70_000] }]);
        assert_eq!(big.check(), Err(RequestError::Op(OpError::ValueSize(70_000))));
        assert!(requests().iter().all(|r| r.check().is_ok()));
    }

    #[test]
    fn unknown_operation_is_malformed() {
        let mut f = Vec::new();
        requests()[0].encode(1, &mut f);
        f[4 + 1 + 8 + 4] = 9; // first operation's tag
        assert!(matches!(Request::decode(&f[4..]), Err(DecodeError::Invalid { what: "operation", .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Arbitrary and mutated bytes never panic either decoder, and what decodes re-encodes identically.
        #[test]
        fn decoders_are_total(which in any::<prop::sample::Index>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)) {
            let frames = frames();
            let mut f = frames[which.index(frames.len())].clone();
            for (at, x) in flips {
                let i = at % f.len();
                f[i] ^= x;
            }
            let body = &f[4.min(f.len())..];
            if let Ok((id, req)) = Request::decode(body) {
                let mut again = Vec::new();
                req.encode(id, &mut again);
                prop_assert_eq!(&again[4..], body);
            }
            if let Ok((id, resp)) = Response::decode(body) {
                let mut again = Vec::new();
                resp.encode(id, &mut again);
                prop_assert_eq!(&again[4..], body);
            }
        }
    }
}
