//! Taking over a volume (a writer starting, or a replica being promoted) as a
//! state machine with no I/O and no clock: writerd and replicad execute its
//! commands over QUIC, the simulator against its segments, and both feed the
//! replies back.
//!
//! The steps: look at every segment's epoch; claim the next generation on a
//! read quorum of every PG, which no old writer can commit without (candidates
//! that split the segments so that neither can reach a write quorum both lose
//! and retry at the next generation after a random pause, unless a rival holds
//! a write quorum); offer back the records the caller retains (a promoted
//! replica's), then ask again; plan, pull each PG's tail from one segment and
//! decide VCL and VDL (`recovery`); have every segment truncate above VDL,
//! with the history of earlier truncations so that a segment that missed one
//! is cut there too.
//!
//! A read quorum is enough to decide VDL (`recovery`) and serve reads, so a
//! takeover succeeds with an AZ and one more node down. The new writer then
//! allocates no LSN until a write quorum of every PG holds its claim and
//! truncation (`Recovered::claimed`, then its sessions: `WriterCore::writable`):
//! two read quorums need not overlap, and a record it wrote above VDL on a read
//! quorum only could meet another candidate's truncation at a newer epoch on
//! the other three, above a different record at the same LSN.
//!
//! Driving it: after `Takeover::new`, execute every `poll_command()` and feed
//! each reply (`on_status`, `on_offered`, `on_pulled`); call
//! `handle_timeout(now)` once `now` reaches `poll_timeout()`; stop when
//! `outcome()` is `Some`. Times are durations since any origin the caller
//! keeps. Each step asks every segment and goes on once every PG has a write
//! quorum of answers and the others answered or had `STRAGGLER_WAIT` more
//! (with only a read quorum, after `READ_QUORUM_WAIT` for a claim): a
//! segment that misses a claim or truncation is claimed with it again by the
//! new writer's session before it appends there.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use crate::ids::{Epoch, Lsn, PgId};
use crate::quorum::{READ_QUORUM, SEGMENTS_PER_PG, WRITE_QUORUM};
use crate::rand::SplitMix64;
use crate::recovery::{self, Answer, Decision, Plan, RecoveryError};
use crate::wire::{SegmentPosition, Truncation};
use crate::writer::Recovered;

/// How long a segment that did not answer waits before it is asked again.
pub const ROUND_PAUSE: Duration = Duration::from_millis(20);
/// Once every PG has a write quorum of answers, how much longer the others get:
/// a dead node would hold the step for a connect timeout.
pub const STRAGGLER_WAIT: Duration = Duration::from_millis(100);
/// A claim whose answers recovery plans from waits this long after a read
/// quorum answered for a write quorum: with `ack = memory` an acknowledged
/// record may be left on fewer than a write quorum (segments that restarted
/// before flushing it), and only a write quorum of answers is sure to see it
/// then. A read quorum suffices once the others are gone for good.
pub const READ_QUORUM_WAIT: Duration = Duration::from_millis(500);
/// A candidate whose claim split the segments looks again after this plus a
/// random part of the jitter, giving the other candidate time to finish.
pub const CLAIM_RETRY_MIN: Duration = Duration::from_millis(5);
pub const CLAIM_RETRY_JITTER: Duration = Duration::from_millis(50);

/// A segment's answer to `Status`: its epoch (the one just claimed, for a
/// claim), position, reclaimed LSN and recorded truncations, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentStatus {
    pub epoch: Epoch,
    pub position: SegmentPosition,
    pub reclaimed: Lsn,
    pub truncations: Vec<Truncation>,
}

/// What became of a `Command::Status`.
#[derive(Clone, Debug)]
pub enum Reply {
    Status(SegmentStatus),
    /// The segment holds a newer epoch, or this generation for another claimant:
    /// final for this step.
    Refused(String),
    /// No answer (unreachable, timed out, any other error): asked again after `ROUND_PAUSE`.
    Failed(String),
}

/// What the shell executes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Ask segment `segment` of `pg` its status; with a nonzero `epoch`, claim it
    /// (the segment persists the epoch first); with `truncate` (VDL and the
    /// history), also have it discard its records above VDL (and above any
    /// truncation of the history it missed), durably, before it answers. Answer
    /// with `on_status(ask, ..)`.
    Status { ask: u64, pg: PgId, segment: usize, epoch: Epoch, truncate: Option<(Lsn, Vec<Truncation>)> },
    /// Append these encoded runs at `epoch` to the segment, best effort (a segment
    /// ignores duplicates and refuses conflicts); then `on_offered`.
    Offer { pg: PgId, segment: usize, epoch: Epoch, runs: Vec<Bytes> },
    /// Read the segment's records in `(after, upto]`, all of them, in LSN order;
    /// then `on_pulled(ask, ..)`.
    Pull { ask: u64, pg: PgId, segment: usize, after: Lsn, upto: Lsn },
}

/// Records a promoted replica retains, per PG, to offer back to storage: all
/// of the history of the writer at `epoch`, the newest it heard.
#[derive(Clone, Debug, Default)]
pub struct Offer {
    pub epoch: Epoch,
    pub runs: Vec<Vec<Bytes>>,
}

/// How long each step took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    pub claim: Duration,
    pub offer: Duration,
    pub decide: Duration,
    pub truncate: Duration,
}

/// A volume taken over.
#[derive(Clone, Debug)]
pub struct TakenOver {
    pub epoch: Epoch,
    pub vcl: Lsn,
    pub recovered: Recovered,
    /// Every truncation the segments reported, oldest first: sent with each
    /// later claim, so that a segment that missed one is cut there too.
    pub history: Vec<Truncation>,
    pub timings: Timings,
    /// Claims made: more than one when a split with another candidate was retried.
    pub claims: u32,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TakeoverError {
    /// Another candidate holds this generation (or a newer one) on too many segments.
    #[error("another candidate claimed the volume: {0}")]
    Lost(String),
    #[error("no read quorum of storage nodes answered ({short}); last errors: {errors}")]
    NoQuorum { short: String, errors: String },
    #[error("recovery plan: {0}")]
    Plan(#[from] RecoveryError),
    #[error("read pg{pg}'s tail from its segment {segment}: {why}")]
    Pull { pg: usize, segment: usize, why: String },
}

/// The answers of one step: per PG, (segment, status) of those that answered.
type Answers = Vec<Vec<(usize, SegmentStatus)>>;

/// One step's requests: the same `Status` to every segment.
struct Round {
    id: u64,
    /// Answers each PG needs.
    quorum: usize,
    /// How long it waits for a write quorum once it has `quorum` answers.
    patience: Duration,
    epoch: Epoch,
    truncate: Option<(Lsn, Vec<Truncation>)>,
    answers: Vec<Vec<Option<SegmentStatus>>>,
    refused: Vec<Vec<bool>>,
    /// When a segment that failed is asked again (`None`: asked, or settled).
    retry: Vec<Vec<Option<Duration>>>,
    errors: Vec<String>,
    /// Set once quorate: the step ends then at the latest.
    grace: Option<Duration>,
}

impl Round {
    fn answered(&self, pg: usize) -> usize {
        self.answers[pg].iter().flatten().count()
    }

    fn refused_in(&self, pg: usize) -> usize {
        self.refused[pg].iter().filter(|&&x| x).count()
    }

    /// Every PG has a read quorum of answers: the step ends by `grace`.
    fn read_quorate(&self) -> bool {
        (0..self.answers.len()).all(|pg| self.answered(pg) >= self.quorum)
    }

    fn write_quorate(&self) -> bool {
        (0..self.answers.len()).all(|pg| self.answered(pg) >= WRITE_QUORUM.max(self.quorum))
    }

    /// Every PG has a write quorum of answers, or a read quorum and no refusal: a
    /// segment that refused holds a rival's claim, and two candidates could each
    /// hold a read quorum of it (both stuck, neither reaching a write quorum).
    fn quorate(&self) -> bool {
        (0..self.answers.len()).all(|pg| self.answered(pg) >= WRITE_QUORUM.max(self.quorum) || (self.answered(pg) >= self.quorum && self.refused_in(pg) == 0))
    }

    /// When the step ends at the latest, now that it is read quorate.
    fn ends_by(&self, now: Duration) -> Duration {
        let wait = if self.write_quorate() { STRAGGLER_WAIT } else { self.patience };
        self.grace.map_or(now + wait, |g| g.min(now + wait))
    }

    /// A PG in which so many segments refused this round's epoch that no write quorum is left, and how many did
    /// (a candidate holding only a read quorum could never write).
    fn lost(&self) -> Option<(usize, usize)> {
        (0..self.refused.len()).map(|pg| (pg, self.refused_in(pg))).find(|&(_, n)| n > SEGMENTS_PER_PG - WRITE_QUORUM)
    }

    fn settled(&self) -> bool {
        self.answers.iter().zip(&self.refused).all(|(a, r)| a.iter().zip(r).all(|(a, &r)| a.is_some() || r))
    }

    fn ask(&self, pg: usize, segment: usize) -> Command {
        Command::Status { ask: self.id, pg: PgId(pg as u32), segment, epoch: self.epoch, truncate: self.truncate.clone() }
    }

    fn into_answers(self) -> Answers {
        self.answers.into_iter().map(|a| a.into_iter().enumerate().filter_map(|(s, st)| Some((s, st?))).collect()).collect()
    }
}

enum Step {
    /// Every segment's epoch, to claim the generation after the newest.
    Look,
    Claim,
    /// The claim split the segments with another candidate: look again at `until`.
    Pause {
        until: Duration,
        why: String,
    },
    /// After the pause: a rival holding a write quorum wins; otherwise claim again.
    Relook {
        why: String,
    },
    Offer {
        pending: usize,
    },
    /// The claim again after the offer, for the positions it moved.
    Reclaim,
    Pull {
        ask: u64,
        plan: Plan,
        answers: Vec<Vec<Answer>>,
        pulled: Vec<Option<Vec<Bytes>>>,
    },
    Truncate {
        decision: Decision,
        history: Vec<Truncation>,
    },
    Done,
}

pub struct Takeover {
    pgs: usize,
    /// Answers each PG needs at each step: `READ_QUORUM` unless `with_quorum`.
    quorum: usize,
    known_cpl: Lsn,
    offer: Offer,
    deadline: Duration,
    /// Nonces and pauses.
    random: SplitMix64,
    step: Step,
    round: Option<Round>,
    asks: u64,
    epoch: Epoch,
    claims: u32,
    commands: VecDeque<Command>,
    timings: Timings,
    step_started: Duration,
    outcome: Option<Result<TakenOver, TakeoverError>>,
}

impl Takeover {
    /// A takeover of a volume of `pgs` PGs. `known_cpl` is a CPL every PG is
    /// known complete up to (a replica's last VDL from the writer; `Lsn::ZERO`
    /// when nothing is known). `offer.runs[pg]` are encoded records to append
    /// to every claimed segment first (a replica's retained log), so that a
    /// commit acknowledged from memory survives segments that restarted before
    /// flushing it; those above a truncation newer than `offer.epoch` (a
    /// takeover the replica did not hear of) are not offered. The claim gives up at `now + timeout`; `seed` makes the
    /// epoch's nonce and the retry pauses differ between candidates.
    pub fn new(pgs: usize, known_cpl: Lsn, offer: Offer, now: Duration, timeout: Duration, seed: u64) -> Takeover {
        let mut t = Takeover {
            pgs,
            quorum: READ_QUORUM,
            known_cpl,
            offer,
            deadline: now + timeout,
            random: SplitMix64::new(seed),
            step: Step::Look,
            round: None,
            asks: 0,
            epoch: Epoch(0),
            claims: 0,
            commands: VecDeque::new(),
            timings: Timings::default(),
            step_started: now,
            outcome: None,
        };
        t.start_round(Epoch(0), None);
        t
    }

    /// The same takeover, going on with `quorum` answers per PG instead of a read
    /// quorum. A replica promoting itself asks a write quorum: on each side of a
    /// partition into 3 and 3 a replica could otherwise take over read-only, and
    /// on healing each would meet the other's claim and be deposed. Below a read
    /// quorum: the simulator's injected bug, which some seed must catch.
    pub fn with_quorum(mut self, quorum: usize) -> Takeover {
        self.quorum = quorum;
        self.round.as_mut().expect("the look is under way").quorum = quorum;
        self
    }

    /// The next command to execute.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When `handle_timeout` is due, if anything waits for time.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if let Step::Pause { until, .. } = self.step {
            return Some(until);
        }
        let r = self.round.as_ref()?;
        let retry = r.retry.iter().flatten().flatten().copied().min();
        let deadline = (!r.quorate()).then_some(self.deadline);
        [retry, deadline, r.grace].into_iter().flatten().min()
    }

    /// The result, once the takeover ended.
    pub fn outcome(&self) -> Option<&Result<TakenOver, TakeoverError>> {
        self.outcome.as_ref()
    }

    /// The epoch claimed (or being claimed); `Epoch(0)` before the first claim.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The reply to `Command::Status { ask, pg, segment, .. }`.
    pub fn on_status(&mut self, ask: u64, pg: PgId, segment: usize, reply: Reply, now: Duration) {
        let Some(r) = self.round.as_mut().filter(|r| r.id == ask) else { return };
        let (pg, s) = (pg.0 as usize, segment);
        match reply {
            Reply::Status(st) => r.answers[pg][s] = Some(st),
            Reply::Refused(why) => {
                r.refused[pg][s] = true;
                r.errors.push(format!("pg{pg} segment {s}: {why}"));
            }
            Reply::Failed(why) => {
                r.retry[pg][s] = Some(now + ROUND_PAUSE);
                r.errors.push(format!("pg{pg} segment {s}: {why}"));
            }
        }
        if let Some((pg, refused)) = r.lost() {
            let why =
                format!("{} refused by {refused} of pg{pg}'s {SEGMENTS_PER_PG} segments, out of a write quorum's reach: {}", r.epoch, r.errors.join("; "));
            return self.round_done(Err(TakeoverError::Lost(why)), now);
        }
        if r.read_quorate() {
            if r.quorate() && r.settled() {
                return self.round_done(Ok(()), now);
            }
            r.grace = Some(r.ends_by(now));
        }
    }

    /// One `Command::Offer` was executed (whether or not the segment took the records).
    pub fn on_offered(&mut self) {
        let Step::Offer { pending } = &mut self.step else { return };
        *pending -= 1;
        if *pending == 0 {
            self.step = Step::Reclaim;
            self.start_round(self.epoch, None);
        }
    }

    /// The records of `pg` that `Command::Pull` `ask` read, as runs, or why it failed.
    pub fn on_pulled(&mut self, ask: u64, pg: PgId, runs: Result<Vec<Bytes>, String>, now: Duration) {
        let Step::Pull { ask: current, plan, pulled, .. } = &mut self.step else { return };
        if ask != *current {
            return; // a pull of an earlier plan
        }
        let pg = pg.0 as usize;
        match runs {
            Ok(runs) => pulled[pg] = Some(runs),
            Err(why) if now >= self.deadline => {
                let segment = plan.source[pg];
                return self.finish(Err(TakeoverError::Pull { pg, segment, why }));
            }
            Err(_) => {
                // The source went, or restarted and lost what it had not flushed: claim
                // again (the epoch is ours) for the positions now, and plan again.
                self.step = Step::Reclaim;
                return self.start_round(self.epoch, None);
            }
        }
        if pulled.iter().all(Option::is_some) {
            self.decide(now);
        }
    }

    pub fn handle_timeout(&mut self, now: Duration) {
        if let Step::Pause { until, why } = &self.step {
            if now >= *until {
                let why = why.clone();
                self.step = Step::Relook { why };
                self.start_round(Epoch(0), None);
            }
            return;
        }
        let Some(r) = self.round.as_mut() else { return };
        if r.grace.is_some_and(|g| now >= g) {
            if r.quorate() {
                return self.round_done(Ok(()), now);
            }
            let pgs: Vec<String> = (0..self.pgs)
                .filter(|&pg| r.refused_in(pg) > 0)
                .map(|pg| format!("pg{pg}: {} granted, {} refused", r.answered(pg), r.refused_in(pg)))
                .collect();
            let why = format!("{} split with a rival's claim, no write quorum ({}): {}", r.epoch, pgs.join(", "), r.errors.join("; "));
            return self.round_done(Err(TakeoverError::Lost(why)), now);
        }
        if !r.quorate() && now >= self.deadline {
            let short: Vec<String> =
                (0..self.pgs).filter(|&pg| r.answered(pg) < r.quorum).map(|pg| format!("pg{pg}: {} of {SEGMENTS_PER_PG}", r.answered(pg))).collect();
            let errors = r.errors.iter().rev().take(2 * SEGMENTS_PER_PG).cloned().collect::<Vec<_>>().join("; ");
            return self.finish(Err(TakeoverError::NoQuorum { short: short.join(", "), errors }));
        }
        for pg in 0..self.pgs {
            for s in 0..SEGMENTS_PER_PG {
                if r.retry[pg][s].is_some_and(|at| now >= at) {
                    r.retry[pg][s] = None;
                    self.commands.push_back(r.ask(pg, s));
                }
            }
        }
    }

    fn start_round(&mut self, epoch: Epoch, truncate: Option<(Lsn, Vec<Truncation>)>) {
        self.asks += 1;
        // A claim's answers are what recovery plans from (not the look's, nor the truncation's).
        let claim = epoch != Epoch(0) && truncate.is_none();
        let r = Round {
            id: self.asks,
            quorum: self.quorum,
            patience: if claim { READ_QUORUM_WAIT } else { STRAGGLER_WAIT },
            epoch,
            truncate,
            answers: vec![vec![None; SEGMENTS_PER_PG]; self.pgs],
            refused: vec![vec![false; SEGMENTS_PER_PG]; self.pgs],
            retry: vec![vec![None; SEGMENTS_PER_PG]; self.pgs],
            errors: Vec::new(),
            grace: None,
        };
        for pg in 0..self.pgs {
            for s in 0..SEGMENTS_PER_PG {
                self.commands.push_back(r.ask(pg, s));
            }
        }
        self.round = Some(r);
    }

    /// The current step's requests ended: go on to the next step.
    fn round_done(&mut self, result: Result<(), TakeoverError>, now: Duration) {
        let r = self.round.take().expect("a round was under way");
        let step = std::mem::replace(&mut self.step, Step::Done);
        let answers = match result {
            Ok(()) => r.into_answers(),
            Err(TakeoverError::Lost(why)) if matches!(step, Step::Claim) => {
                let jitter = self.random.next_u64() % CLAIM_RETRY_JITTER.as_micros() as u64;
                self.step = Step::Pause { until: now + CLAIM_RETRY_MIN + Duration::from_micros(jitter), why };
                return;
            }
            Err(e) => return self.finish(Err(e)),
        };
        match step {
            Step::Look => self.claim(&answers),
            Step::Relook { why } => {
                if let Some(other) = rival(&answers, self.epoch) {
                    return self.finish(Err(TakeoverError::Lost(format!("{why}; {other} holds a write quorum of a PG"))));
                }
                if now >= self.deadline {
                    return self.finish(Err(TakeoverError::Lost(why)));
                }
                self.claim(&answers);
            }
            Step::Claim => {
                self.timings.claim = now - self.step_started;
                self.step_started = now;
                // Records written before a truncation their writer did not hear of are not the
                // volume's: a replica that missed a takeover holds the old writer's discarded tail.
                let newer = answers.iter().flatten().flat_map(|(_, st)| &st.truncations).filter(|t| t.epoch > self.offer.epoch);
                let cut = newer.map(|t| t.above).min();
                let runs: Vec<Vec<Bytes>> = self.offer.runs.iter().map(|runs| cut.map_or_else(|| runs.clone(), |cut| recovery::keep_upto(runs, cut))).collect();
                let offers: Vec<Command> = runs
                    .iter()
                    .enumerate()
                    .filter(|(_, runs)| !runs.is_empty())
                    .flat_map(|(pg, runs)| answers[pg].iter().map(move |&(segment, _)| (pg, segment, runs)))
                    .map(|(pg, segment, runs)| Command::Offer { pg: PgId(pg as u32), segment, epoch: self.epoch, runs: runs.clone() })
                    .collect();
                if offers.is_empty() {
                    self.plan(answers, now);
                } else {
                    self.step = Step::Offer { pending: offers.len() };
                    self.commands.extend(offers);
                }
            }
            Step::Reclaim => {
                self.timings.offer = now - self.step_started;
                self.step_started = now;
                self.plan(answers, now);
            }
            Step::Truncate { decision, history } => {
                self.timings.truncate = now - self.step_started;
                let d = decision;
                let claimed = answers.iter().map(|pg| std::array::from_fn(|s| pg.iter().any(|&(seg, _)| seg == s))).collect();
                let recovered = Recovered { vdl: d.vdl, pg_last: d.pg_last, tails: d.tails, claimed };
                let taken = TakenOver { epoch: self.epoch, vcl: d.vcl, recovered, history, timings: self.timings, claims: self.claims };
                self.finish(Ok(taken));
            }
            Step::Pause { .. } | Step::Offer { .. } | Step::Pull { .. } | Step::Done => unreachable!("no requests in this step"),
        }
    }

    /// Claims the generation after the newest epoch in `seen`.
    fn claim(&mut self, seen: &Answers) {
        let newest = seen.iter().flatten().map(|(_, st)| st.epoch).max().unwrap_or_default();
        self.epoch = Epoch::claim_after(newest, self.random.next_u64() as u32);
        self.claims += 1;
        self.step = Step::Claim;
        self.start_round(self.epoch, None);
    }

    fn plan(&mut self, claimed: Answers, now: Duration) {
        // A segment's log is as of its newest truncation's epoch (the claim just
        // raised its epoch; what it holds was written before).
        let answers: Vec<Vec<Answer>> = claimed
            .into_iter()
            .map(|pg| {
                pg.into_iter()
                    .map(|(segment, st)| Answer {
                        segment,
                        epoch: st.truncations.last().map_or(Epoch(0), |t| t.epoch),
                        scl: st.position.scl,
                        reclaimed: st.reclaimed,
                        truncations: st.truncations,
                    })
                    .collect()
            })
            .collect();
        let plan = match recovery::plan(&answers, self.known_cpl, self.quorum) {
            Ok(plan) => plan,
            Err(e) => return self.finish(Err(e.into())),
        };
        let mut pulled = vec![None; self.pgs];
        self.asks += 1;
        let ask = self.asks;
        for (pg, slot) in pulled.iter_mut().enumerate() {
            let (after, upto) = (plan.from[pg], plan.upto[pg]);
            if after < upto {
                self.commands.push_back(Command::Pull { ask, pg: PgId(pg as u32), segment: plan.source[pg], after, upto });
            } else {
                *slot = Some(Vec::new());
            }
        }
        let ready = pulled.iter().all(Option::is_some);
        self.step = Step::Pull { ask, plan, answers, pulled };
        if ready {
            self.decide(now);
        }
    }

    fn decide(&mut self, now: Duration) {
        let Step::Pull { plan, answers, pulled, .. } = std::mem::replace(&mut self.step, Step::Done) else { unreachable!("decide after the pulls") };
        let pulled: Vec<Vec<Bytes>> = pulled.into_iter().map(|p| p.expect("every PG pulled")).collect();
        let decision = recovery::decide(&plan, &pulled);
        self.timings.decide = now - self.step_started;
        self.step_started = now;
        let mut history: Vec<Truncation> = answers.iter().flatten().flat_map(|a| a.truncations.iter().copied()).filter(|t| t.epoch != self.epoch).collect();
        history.sort_by_key(|t| t.epoch);
        history.dedup();
        self.start_round(self.epoch, Some((decision.vdl, history.clone())));
        self.step = Step::Truncate { decision, history };
    }

    fn finish(&mut self, outcome: Result<TakenOver, TakeoverError>) {
        self.step = Step::Done;
        self.round = None;
        self.outcome = Some(outcome);
    }
}

/// A claimant of `ours`' generation or a newer one that this candidate must
/// yield to: one holding a write quorum of every PG (it won), or of some PG
/// with a higher epoch (after a split the higher one retries, the other
/// stands down; a winner still finishing its claim is most likely seen whole
/// after the pause).
fn rival(answers: &Answers, ours: Epoch) -> Option<Epoch> {
    let quorum_in = |e: Epoch, pg: &Vec<(usize, SegmentStatus)>| pg.iter().filter(|(_, st)| st.epoch == e).count() >= WRITE_QUORUM;
    let mut others: Vec<Epoch> = answers.iter().flatten().map(|(_, st)| st.epoch).filter(|e| *e != ours && e.generation() >= ours.generation()).collect();
    others.sort();
    others.dedup();
    others.into_iter().find(|&e| answers.iter().all(|pg| quorum_in(e, pg)) || (e > ours && answers.iter().any(|pg| quorum_in(e, pg))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn status(epoch: Epoch) -> Reply {
        status_at(epoch, Lsn::ZERO)
    }

    fn status_at(epoch: Epoch, scl: Lsn) -> Reply {
        Reply::Status(SegmentStatus { epoch, position: SegmentPosition { pg: PgId(0), scl, flushed_lsn: scl }, reclaimed: Lsn::ZERO, truncations: Vec::new() })
    }

    /// A one-PG takeover on an empty volume.
    fn takeover() -> Takeover {
        Takeover::new(1, Lsn::ZERO, Offer::default(), Duration::ZERO, Duration::from_secs(1), 7)
    }

    /// `takeover()` once every segment answered its look at `MS`, and its claim asks.
    fn claiming() -> (Takeover, Vec<(u64, usize, Epoch, bool)>) {
        let mut t = takeover();
        let look = asks(&mut t);
        answer(&mut t, &look, &[0, 1, 2, 3, 4, 5], |_| status(Epoch(0)), MS);
        let claim = asks(&mut t);
        (t, claim)
    }

    /// The Status commands pending: (ask, segment, epoch, truncating).
    fn asks(t: &mut Takeover) -> Vec<(u64, usize, Epoch, bool)> {
        std::iter::from_fn(|| t.poll_command())
            .map(|c| match c {
                Command::Status { ask, pg, segment, epoch, truncate } => {
                    assert_eq!(pg, PgId(0));
                    (ask, segment, epoch, truncate.is_some())
                }
                other => panic!("expected Status, got {other:?}"),
            })
            .collect()
    }

    /// Answers `segments` of the pending asks with `reply(epoch asked)`.
    fn answer(t: &mut Takeover, asks: &[(u64, usize, Epoch, bool)], segments: &[usize], reply: impl Fn(Epoch) -> Reply, now: Duration) {
        for &(ask, s, epoch, _) in asks.iter().filter(|a| segments.contains(&a.1)) {
            t.on_status(ask, PgId(0), s, reply(epoch), now);
        }
    }

    #[test]
    fn empty_segments_are_claimed_and_truncated_at_zero() {
        let mut t = takeover();
        let all = [0, 1, 2, 3, 4, 5];
        let look = asks(&mut t);
        assert!(look.iter().all(|a| a.2 == Epoch(0) && !a.3) && look.len() == 6);
        answer(&mut t, &look, &all, |_| status(Epoch(0)), MS);
        let claim = asks(&mut t);
        let epoch = claim[0].2;
        assert!(epoch.generation() == 1 && claim.iter().all(|a| a.2 == epoch && !a.3));
        answer(&mut t, &claim, &all, status, 2 * MS);
        let truncate = asks(&mut t);
        assert!(truncate.iter().all(|a| a.2 == epoch && a.3));
        answer(&mut t, &truncate, &all, status, 3 * MS);
        let taken = t.outcome().expect("done").as_ref().expect("taken over");
        assert_eq!((taken.epoch, taken.recovered.vdl, taken.claims), (epoch, Lsn::ZERO, 1));
        assert_eq!(taken.timings.claim, 2 * MS);
    }

    #[test]
    fn a_failed_pull_claims_again_and_plans_anew() {
        let (mut t, claim) = claiming();
        let all = [0, 1, 2, 3, 4, 5];
        answer(&mut t, &claim, &all, |e| status_at(e, Lsn(5)), 2 * MS);
        let Some(Command::Pull { ask, pg, segment, after, upto }) = t.poll_command() else { panic!("a pull of the tail") };
        assert_eq!((pg, after, upto), (PgId(0), Lsn::ZERO, Lsn(5)));
        // The source restarted and lost its unflushed tail meanwhile.
        t.on_pulled(ask, pg, Err(format!("segment {segment} returned nothing after 0")), 3 * MS);
        assert!(t.outcome().is_none(), "not a failed takeover");
        let reclaim = asks(&mut t);
        assert!(reclaim.len() == 6 && reclaim.iter().all(|a| a.2 == claim[0].2 && !a.3), "the same epoch claimed again: {reclaim:?}");
        answer(&mut t, &reclaim, &all, status, 4 * MS);
        // The first plan's pull, answered late: ignored.
        t.on_pulled(ask, pg, Ok(Vec::new()), 5 * MS);
        let truncate = asks(&mut t);
        assert!(truncate.iter().all(|a| a.3), "nothing left to pull: the truncation");
        answer(&mut t, &truncate, &all, status, 6 * MS);
        assert_eq!(t.outcome().expect("done").as_ref().expect("taken over").recovered.vdl, Lsn::ZERO);
    }

    #[test]
    fn stragglers_get_a_grace_then_the_step_goes_on_and_late_replies_are_ignored() {
        let mut t = takeover();
        let look = asks(&mut t);
        answer(&mut t, &look, &[0, 1, 2, 3], |_| status(Epoch(0)), MS);
        assert_eq!(t.poll_timeout(), Some(MS + STRAGGLER_WAIT));
        assert!(asks(&mut t).is_empty(), "quorate: waits for the others");
        t.handle_timeout(MS + STRAGGLER_WAIT);
        let claim = asks(&mut t);
        assert!(claim.iter().all(|a| a.2.generation() == 1));
        // A straggler of the look arrives during the claim: ignored.
        answer(&mut t, &look, &[4], |_| status(Epoch(0)), 200 * MS);
        answer(&mut t, &claim, &[0, 1, 2], status, 200 * MS);
        assert!(asks(&mut t).is_empty() && t.outcome().is_none());
    }

    #[test]
    fn silent_segments_are_asked_again_until_the_deadline() {
        let mut t = takeover();
        let look = asks(&mut t);
        answer(&mut t, &look, &[0, 1], |_| status(Epoch(0)), MS);
        answer(&mut t, &look, &[2, 3, 4, 5], |_| Reply::Failed("unreachable".into()), MS);
        assert_eq!(t.poll_timeout(), Some(MS + ROUND_PAUSE));
        t.handle_timeout(MS + ROUND_PAUSE);
        let again = asks(&mut t);
        assert_eq!(again.iter().map(|a| a.1).collect::<Vec<_>>(), vec![2, 3, 4, 5], "only the silent ones are asked again");
        answer(&mut t, &again, &[2, 3, 4, 5], |_| Reply::Failed("unreachable".into()), 30 * MS);
        t.handle_timeout(Duration::from_secs(1));
        match t.outcome() {
            Some(Err(TakeoverError::NoQuorum { short, errors })) => assert!(short.contains("2 of 6") && errors.contains("unreachable"), "{short}; {errors}"),
            other => panic!("expected NoQuorum, got {other:?}"),
        }
    }

    #[test]
    fn a_read_quorum_takes_over_and_the_writer_holds_only_its_claims() {
        let mut t = takeover();
        let (up, down) = ([1, 3, 5], [0, 2, 4]);
        let look = asks(&mut t);
        answer(&mut t, &look, &up, |_| status(Epoch(0)), MS);
        answer(&mut t, &look, &down, |_| Reply::Failed("unreachable".into()), MS);
        t.handle_timeout(MS + STRAGGLER_WAIT);
        let mut now = MS + STRAGGLER_WAIT;
        // The claim waits longer for a write quorum of answers than the truncation.
        for (truncating, wait) in [(false, READ_QUORUM_WAIT), (true, STRAGGLER_WAIT)] {
            let round = asks(&mut t);
            assert!(round.len() == 6 && round.iter().all(|a| a.3 == truncating), "{round:?}");
            answer(&mut t, &round, &up, status, now);
            answer(&mut t, &round, &down, |_| Reply::Failed("unreachable".into()), now);
            if !truncating {
                t.handle_timeout(now + STRAGGLER_WAIT);
                let again = asks(&mut t);
                assert!(again.iter().all(|a| down.contains(&a.1) && !a.3), "still claiming: {again:?}");
            }
            now += wait;
            t.handle_timeout(now);
        }
        let taken = t.outcome().expect("done").as_ref().expect("taken over by a read quorum");
        assert_eq!(taken.recovered.claimed, vec![[false, true, false, true, false, true]]);
    }

    #[test]
    fn a_read_quorum_beside_a_refusal_is_a_split_not_a_win() {
        let (mut t, claim) = claiming();
        answer(&mut t, &claim, &[0, 1, 2], status, 2 * MS);
        answer(&mut t, &claim, &[3], |_| Reply::Refused("held by another claimant".into()), 2 * MS);
        answer(&mut t, &claim, &[4, 5], |_| Reply::Failed("unreachable".into()), 2 * MS);
        // The rival may hold 3, 4 and 5: neither could ever write. Given time for a write quorum, then a split.
        t.handle_timeout(2 * MS + READ_QUORUM_WAIT);
        std::iter::from_fn(|| t.poll_command()).for_each(drop); // retries of 4 and 5
        assert!(t.outcome().is_none());
        let pause = t.poll_timeout().expect("pauses");
        assert!(pause >= 2 * MS + READ_QUORUM_WAIT + CLAIM_RETRY_MIN, "{pause:?}");
        t.handle_timeout(pause);
        assert!(asks(&mut t).iter().all(|a| a.2 == Epoch(0)), "looks again, to claim the next generation");
    }

    #[test]
    fn a_split_claim_pauses_then_yields_to_a_rival_with_a_quorum() {
        let (mut t, claim) = claiming();
        let ours = claim[0].2;
        let rival = Epoch::claim_after(Epoch(0), u32::MAX);
        answer(&mut t, &claim, &[0, 1, 2], |_| Reply::Refused("held by another claimant".into()), 2 * MS);
        let pause = t.poll_timeout().expect("pauses");
        assert!(pause >= 2 * MS + CLAIM_RETRY_MIN && pause < 2 * MS + CLAIM_RETRY_MIN + CLAIM_RETRY_JITTER);
        assert!(asks(&mut t).is_empty());
        t.handle_timeout(pause);
        let relook = asks(&mut t);
        assert!(relook.iter().all(|a| a.2 == Epoch(0)));
        answer(&mut t, &relook, &[0, 1, 2, 3], |_| status(rival), pause + MS);
        answer(&mut t, &relook, &[4, 5], |_| status(ours), pause + MS);
        match t.outcome() {
            Some(Err(TakeoverError::Lost(why))) => assert!(why.contains(&rival.to_string()), "{why}"),
            other => panic!("expected Lost, got {other:?}"),
        }
    }

    #[test]
    fn a_split_without_a_winner_is_claimed_again_at_the_next_generation() {
        let (mut t, claim) = claiming();
        let (ours, other) = (claim[0].2, Epoch::claim_after(Epoch(0), 1));
        answer(&mut t, &claim, &[0, 1, 2], |_| Reply::Refused("held by another claimant".into()), 2 * MS);
        t.handle_timeout(t.poll_timeout().expect("pauses"));
        let relook = asks(&mut t);
        answer(&mut t, &relook, &[0, 1, 2], |_| status(other), 100 * MS);
        answer(&mut t, &relook, &[3, 4, 5], |_| status(ours), 100 * MS);
        let again = asks(&mut t);
        assert!(again.iter().all(|a| a.2.generation() == 2 && !a.3), "{again:?}");
        assert_eq!(t.epoch(), again[0].2);
    }
}
