//! Failure detection and the choice of who promotes: a replica that has not
//! heard its writer for the failover silence asks the volume's writer address
//! and its peer replicas their `Role`, and promotes only if no writer (of its
//! epoch or newer) and no promoting peer answers and no better-placed peer
//! lost the writer too. `Watch` sequences it in time (`handle_timeout`), with
//! the deferral to a better peer until that peer has been unheard for
//! `PEER_GONE`; replicad's `watch` executes it.

use std::time::Duration;

use crate::api::Role;

/// After a peer was seen better placed or promoting, how long it must stay unheard before
/// this replica promotes instead: a busy peer may miss a `Role` request a few times, and two
/// promotions fence each other.
pub const PEER_GONE: Duration = Duration::from_secs(2);

/// What a replica that has not heard its writer for the failover silence does, given the
/// `Role`s that answered it (the volume's writer address and its peer replicas).
#[derive(Debug, PartialEq, Eq)]
pub enum Failover<A> {
    /// A writer of this replica's epoch or a newer one answered (a peer promoted): follow it.
    WriterLives(A),
    /// A peer is taking over the volume: it is the writer-to-be.
    PeerPromoting(A),
    /// A peer that lost the writer too is better placed: it should promote.
    BetterPeer(A),
    /// This replica is the best of those that answered: it promotes.
    Promote,
}

/// The failover rule: the replica with the highest read point promotes, then the
/// highest priority, then the lowest address; only peers that have been silent as long
/// (`silence_ms`) compete, and none while a writer or a promoting peer answers. `me` and
/// `mine` are the deciding replica's own address and role.
pub fn failover<A: Ord + Copy>(me: A, mine: &Role, answers: &[(A, Role)], silence_ms: u64) -> Failover<A> {
    if let Some((addr, _)) = answers.iter().find(|(_, role)| role.writer && role.epoch >= mine.epoch) {
        return Failover::WriterLives(*addr);
    }
    if let Some((addr, _)) = answers.iter().find(|(_, role)| role.promoting) {
        return Failover::PeerPromoting(*addr);
    }
    let rank = |addr: A, role: &Role| (role.vdl, role.priority, std::cmp::Reverse(addr));
    let better = answers.iter().filter(|(_, role)| !role.writer && role.writer_silent_ms >= silence_ms).find(|(addr, role)| rank(*addr, role) > rank(me, mine));
    match better {
        Some((addr, _)) => Failover::BetterPeer(*addr),
        None => Failover::Promote,
    }
}

/// What `Watch::on_roles` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<A> {
    /// Promote now.
    Promote,
    /// A writer lives: keep following (the writer feed finds it).
    Follow(A),
    /// Another replica promotes (or is better placed to); `first` when it was not the one deferred to already.
    Defer { peer: A, first: bool },
    /// This replica is the best of those that answered, but the peer it deferred to was
    /// heard within `PEER_GONE`: wait.
    Wait(A),
}

/// One replica's failure detector, sans-IO: call `handle_timeout(now, heard)` at
/// `poll_timeout()`; when it says so, ask the roles and feed them to `on_roles`.
#[derive(Debug)]
pub struct Watch<A> {
    silence: Duration,
    next: Duration,
    /// The peer deferred to last, and when it was last seen better placed or promoting.
    deferred: Option<(A, Duration)>,
}

impl<A: Ord + Copy> Watch<A> {
    /// Promotes once the writer has been silent for `silence`, checking four times as often.
    pub fn new(silence: Duration, now: Duration) -> Self {
        Watch { silence, next: now + silence / 4, deferred: None }
    }

    pub fn poll_timeout(&self) -> Duration {
        self.next
    }

    /// A check is due: whether to ask the roles now. `heard` is when the writer was last
    /// heard (`None`: never; a replica started while no writer runs does not promote).
    pub fn handle_timeout(&mut self, now: Duration, heard: Option<Duration>) -> bool {
        self.next = now + self.silence / 4;
        heard.is_some_and(|at| now.saturating_sub(at) >= self.silence)
    }

    /// The roles that answered (`me`, `mine`: this replica's address and role).
    pub fn on_roles(&mut self, now: Duration, me: A, mine: &Role, roles: &[(A, Role)]) -> Verdict<A> {
        match failover(me, mine, roles, self.silence.as_millis() as u64) {
            Failover::WriterLives(writer) => Verdict::Follow(writer),
            Failover::PeerPromoting(peer) | Failover::BetterPeer(peer) => {
                let first = self.deferred.is_none_or(|(was, _)| was != peer);
                self.deferred = Some((peer, now));
                Verdict::Defer { peer, first }
            }
            Failover::Promote => match self.deferred.filter(|&(_, at)| now.saturating_sub(at) < PEER_GONE) {
                Some((peer, _)) => Verdict::Wait(peer),
                None => Verdict::Promote,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Epoch, Lsn};

    #[test]
    fn failover_promotes_the_best_silent_replica_unless_a_writer_answers() {
        let replica =
            |vdl: u64, priority: u32, silent_ms: u64| Role { vdl: Lsn(vdl), priority, writer_silent_ms: silent_ms, epoch: Epoch(5), ..Role::default() };
        let mine = replica(10, 0, 400);
        assert_eq!(failover(2, &mine, &[], 300), Failover::Promote, "alone");
        assert_eq!(failover(2, &mine, &[(3, replica(9, 9, 400))], 300), Failover::Promote, "a peer with a lower read point");
        assert_eq!(failover(2, &mine, &[(3, replica(11, 0, 400))], 300), Failover::BetterPeer(3), "a higher read point");
        assert_eq!(failover(2, &mine, &[(3, replica(11, 0, 100))], 300), Failover::Promote, "a better peer that still hears the writer does not compete");
        assert_eq!(failover(2, &mine, &[(3, replica(10, 1, 400))], 300), Failover::BetterPeer(3), "same read point, higher priority");
        assert_eq!(failover(2, &mine, &[(1, replica(10, 0, 400))], 300), Failover::BetterPeer(1), "all equal: the lower address");
        assert_eq!(failover(2, &mine, &[(3, replica(10, 0, 400))], 300), Failover::Promote);
        let promoting = Role { promoting: true, ..replica(1, 0, 400) };
        assert_eq!(failover(2, &mine, &[(3, promoting)], 300), Failover::PeerPromoting(3), "even a worse peer, once it is taking over");
        let writer = |epoch| Role { writer: true, epoch: Epoch(epoch), ..Role::default() };
        assert_eq!(failover(2, &mine, &[(3, replica(11, 0, 400)), (9, writer(6))], 300), Failover::WriterLives(9));
        assert_eq!(failover(2, &mine, &[(9, writer(4))], 300), Failover::Promote, "a writer of an older epoch is fenced");
    }

    #[test]
    fn the_watch_asks_after_the_silence_and_waits_out_a_deferred_peer() {
        let ms = Duration::from_millis;
        let mut w = Watch::new(ms(400), Duration::ZERO);
        assert_eq!(w.poll_timeout(), ms(100));
        assert!(!w.handle_timeout(ms(100), None), "a writer never heard is never replaced");
        assert!(!w.handle_timeout(ms(200), Some(ms(0))), "silent for less than the silence");
        assert!(w.handle_timeout(ms(400), Some(ms(0))));
        assert_eq!(w.poll_timeout(), ms(500));
        let replica = |vdl: u64, silent_ms: u64| Role { vdl: Lsn(vdl), writer_silent_ms: silent_ms, epoch: Epoch(5), ..Role::default() };
        let mine = replica(10, 400);
        assert_eq!(w.on_roles(ms(400), 2, &mine, &[(3, replica(11, 400))]), Verdict::Defer { peer: 3, first: true });
        assert_eq!(w.on_roles(ms(500), 2, &mine, &[(3, replica(11, 400))]), Verdict::Defer { peer: 3, first: false });
        // The better peer stops answering: wait PEER_GONE from when it was last seen.
        assert_eq!(w.on_roles(ms(600), 2, &mine, &[]), Verdict::Wait(3));
        assert_eq!(w.on_roles(ms(500) + PEER_GONE, 2, &mine, &[]), Verdict::Promote);
        let writer = Role { writer: true, epoch: Epoch(5), ..Role::default() };
        assert_eq!(w.on_roles(ms(3000), 2, &mine, &[(9, writer)]), Verdict::Follow(9));
    }
}
