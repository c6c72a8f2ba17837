//! Volume layout: the storage nodes, the protection groups (page ranges) and
//! which six nodes hold each PG's segments. One TOML file, read by writerd,
//! replicad, loadgen and scripts/cluster:
//!
//! ```toml
//! page_count = 4096              # pages of the volume; key_page() spreads keys over them
//! page_bytes_max = 1048576       # largest page (its image); optional, this is the default
//! writer = "127.0.0.1:7090"      # client API of writerd
//!
//! [[node]]                       # one per storaged
//! id = 1
//! az = "a"
//! addr = "127.0.0.1:7101"
//!
//! [[pg]]                         # ids 0, 1, ... in order; page ranges cover the volume
//! id = 0
//! first_page = 0
//! end_page = 2048                # exclusive
//! nodes = [1, 2, 3, 4, 5, 6]     # 6 distinct nodes, 2 in each of 3 AZs
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{NodeId, PageId, PgId};
use crate::page::{entry_bytes, key_page, KEY_BYTES_MAX, PAGE_HEADER_BYTES, VALUE_BYTES_MAX};
use crate::page_index::IMAGE_BYTES_MAX;
use crate::quorum::SEGMENTS_PER_PG;

/// The default page size limit. A page travels whole: every GetPage@LSN reply
/// (a writer's or replica's cache miss) and every coalesced image carries all
/// of it, and the caches hold whole pages. 1 MiB keeps such a read about a
/// millisecond on a fast network, a 256 MiB cache at 256 pages or more, and
/// sits far below the 16 MiB frame a page reply must fit (`IMAGE_BYTES_MAX`).
/// The volume holds at most `page_count` times this much.
pub const PAGE_BYTES_MAX_DEFAULT: u64 = 1 << 20;
/// The smallest limit: an empty page must take any single put.
pub const PAGE_BYTES_MAX_MIN: u64 = (PAGE_HEADER_BYTES + entry_bytes(KEY_BYTES_MAX, VALUE_BYTES_MAX)) as u64;

/// Availability zones a PG spans, with `SEGMENTS_PER_PG / AZ_COUNT` segments in each.
pub const AZ_COUNT: usize = 3;
const _: () = assert!(SEGMENTS_PER_PG.is_multiple_of(AZ_COUNT));

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: u32,
    pub az: String,
    /// `host:port` of the node's QUIC endpoint.
    pub addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgSpec {
    pub id: u32,
    pub first_page: u64,
    pub end_page: u64,
    pub nodes: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub page_count: u64,
    /// Largest page, in bytes of its image: a write that would grow a page past it is
    /// refused. Part of the volume because every writer must enforce the same limit and
    /// storage must be able to serve any page; a file without it gets the default.
    #[serde(default = "page_bytes_max_default")]
    pub page_bytes_max: u64,
    /// Client API address of the writer.
    pub writer: String,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeSpec>,
    #[serde(rename = "pg")]
    pub pgs: Vec<PgSpec>,
}

fn page_bytes_max_default() -> u64 {
    PAGE_BYTES_MAX_DEFAULT
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("volume file: {0}")]
    Parse(String),
    #[error("page_count must be positive")]
    NoPages,
    #[error("page_bytes_max {0} must be between {PAGE_BYTES_MAX_MIN} (a page must take one largest put) and {IMAGE_BYTES_MAX} (a page reply's frame)")]
    PageBytes(u64),
    #[error("node id {0} appears twice")]
    DuplicateNode(u32),
    #[error("protection groups must be numbered 0, 1, ... in order; found pg{found} at position {at}")]
    PgOrder { at: usize, found: u32 },
    #[error("pg{pg}: pages [{first}, {end}) do not continue from page {expected} (PG page ranges must tile 0..page_count)")]
    PageGap { pg: u32, first: u64, end: u64, expected: u64 },
    #[error("PG page ranges end at page {end}, but the volume has {page_count} pages")]
    PagesUncovered { end: u64, page_count: u64 },
    #[error("pg{pg}: {reason}")]
    Placement { pg: u32, reason: String },
}

impl Volume {
    pub fn from_toml(text: &str) -> Result<Volume, VolumeError> {
        let v: Volume = toml::from_str(text).map_err(|e| VolumeError::Parse(e.to_string()))?;
        v.validate()?;
        Ok(v)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a volume always serialises")
    }

    /// A volume of `pg_count` PGs over `nodes` (id, az, addr), each PG on the
    /// first six nodes: the layout of a local test cluster.
    pub fn local(writer: String, nodes: Vec<NodeSpec>, pg_count: u32, page_count: u64) -> Result<Volume, VolumeError> {
        let per_pg = page_count.div_ceil(pg_count as u64);
        let pgs = (0..pg_count)
            .map(|i| PgSpec {
                id: i,
                first_page: (i as u64 * per_pg).min(page_count),
                end_page: ((i as u64 + 1) * per_pg).min(page_count),
                nodes: nodes.iter().take(SEGMENTS_PER_PG).map(|n| n.id).collect(),
            })
            .collect();
        let v = Volume { page_count, page_bytes_max: PAGE_BYTES_MAX_DEFAULT, writer, nodes, pgs };
        v.validate()?;
        Ok(v)
    }

    pub fn validate(&self) -> Result<(), VolumeError> {
        if self.page_count == 0 {
            return Err(VolumeError::NoPages);
        }
        if !(PAGE_BYTES_MAX_MIN..=IMAGE_BYTES_MAX as u64).contains(&self.page_bytes_max) {
            return Err(VolumeError::PageBytes(self.page_bytes_max));
        }
        let mut azs = BTreeMap::new();
        for n in &self.nodes {
            if azs.insert(n.id, n.az.as_str()).is_some() {
                return Err(VolumeError::DuplicateNode(n.id));
            }
        }
        let mut expected = 0;
        for (at, pg) in self.pgs.iter().enumerate() {
            if pg.id as usize != at {
                return Err(VolumeError::PgOrder { at, found: pg.id });
            }
            if pg.first_page != expected || pg.end_page <= pg.first_page {
                return Err(VolumeError::PageGap { pg: pg.id, first: pg.first_page, end: pg.end_page, expected });
            }
            expected = pg.end_page;
            let placement = |reason: String| VolumeError::Placement { pg: pg.id, reason };
            if pg.nodes.len() != SEGMENTS_PER_PG || pg.nodes.iter().collect::<BTreeSet<_>>().len() != SEGMENTS_PER_PG {
                return Err(placement(format!("needs {SEGMENTS_PER_PG} distinct nodes, has {:?}", pg.nodes)));
            }
            let mut per_az: BTreeMap<&str, usize> = BTreeMap::new();
            for id in &pg.nodes {
                let az = azs.get(id).ok_or_else(|| placement(format!("node {id} is not declared")))?;
                *per_az.entry(az).or_default() += 1;
            }
            if per_az.len() != AZ_COUNT || per_az.values().any(|&c| c != SEGMENTS_PER_PG / AZ_COUNT) {
                return Err(placement(format!("segments per AZ are {per_az:?}; need {} in each of {AZ_COUNT} AZs", SEGMENTS_PER_PG / AZ_COUNT)));
            }
        }
        if expected != self.page_count {
            return Err(VolumeError::PagesUncovered { end: expected, page_count: self.page_count });
        }
        Ok(())
    }

    pub fn pg_count(&self) -> usize {
        self.pgs.len()
    }

    /// The PG holding `page`.
    pub fn pg_of(&self, page: PageId) -> PgId {
        let i = self.pgs.partition_point(|p| p.end_page <= page.0);
        assert!(i < self.pgs.len(), "{page} is beyond the volume's {} pages", self.page_count);
        PgId(i as u32)
    }

    /// The page of `key`.
    pub fn page_of(&self, key: &[u8]) -> PageId {
        key_page(key, self.page_count)
    }

    /// The six nodes of `pg`, in segment order (segment index = position).
    pub fn segments(&self, pg: PgId) -> impl Iterator<Item = &NodeSpec> + '_ {
        self.pgs[pg.0 as usize].nodes.iter().map(|id| self.node(NodeId(*id)).expect("validated"))
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id.0)
    }

    /// PGs with a segment on `node`.
    pub fn pgs_on(&self, node: NodeId) -> Vec<PgId> {
        self.pgs.iter().filter(|p| p.nodes.contains(&node.0)).map(|p| PgId(p.id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u32) -> Vec<NodeSpec> {
        (1..=n).map(|i| NodeSpec { id: i, az: ["a", "b", "c"][((i - 1) / 2 % 3) as usize].into(), addr: format!("127.0.0.1:{}", 7100 + i) }).collect()
    }

    #[test]
    fn local_layout_round_trips_through_toml() {
        let v = Volume::local("127.0.0.1:7090".into(), nodes(6), 3, 1000).unwrap();
        assert_eq!(v.pgs.iter().map(|p| (p.first_page, p.end_page)).collect::<Vec<_>>(), [(0, 334), (334, 668), (668, 1000)]);
        assert_eq!(Volume::from_toml(&v.to_toml()).unwrap(), v);
        assert_eq!(v.pg_of(PageId(0)), PgId(0));
        assert_eq!(v.pg_of(PageId(334)), PgId(1));
        assert_eq!(v.pg_of(PageId(999)), PgId(2));
        assert_eq!(v.segments(PgId(1)).map(|n| n.id).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(v.pgs_on(NodeId(4)).len(), 3);
    }

    #[test]
    fn refuses_bad_layouts() {
        let good = Volume::local("w:1".into(), nodes(6), 2, 10).unwrap();
        let mut v = good.clone();
        v.pgs[0].nodes[5] = 1;
        assert!(matches!(v.validate(), Err(VolumeError::Placement { pg: 0, .. })));
        let mut v = good.clone();
        v.nodes[2].az = "a".into(); // three segments in AZ a
        assert!(matches!(v.validate(), Err(VolumeError::Placement { .. })));
        let mut v = good.clone();
        v.pgs[1].first_page = 6;
        assert!(matches!(v.validate(), Err(VolumeError::PageGap { pg: 1, .. })));
        let mut v = good.clone();
        v.page_count = 11;
        assert!(matches!(v.validate(), Err(VolumeError::PagesUncovered { .. })));
        let mut v = good.clone();
        v.page_bytes_max = PAGE_BYTES_MAX_MIN - 1;
        assert_eq!(v.validate(), Err(VolumeError::PageBytes(PAGE_BYTES_MAX_MIN - 1)));
        let mut v = good.clone();
        v.pgs.swap(0, 1);
        assert!(matches!(v.validate(), Err(VolumeError::PgOrder { .. })));
        let mut v = good;
        v.pgs[0].nodes[0] = 9;
        assert!(matches!(v.validate(), Err(VolumeError::Placement { .. })));
        assert!(matches!(Volume::from_toml("page_count = 'x'"), Err(VolumeError::Parse(_))));
    }

    #[test]
    fn a_file_without_a_page_limit_gets_the_default() {
        let v = Volume::local("w:1".into(), nodes(6), 1, 10).unwrap();
        let text = v.to_toml().replace(&format!("page_bytes_max = {PAGE_BYTES_MAX_DEFAULT}\n"), "");
        assert!(!text.contains("page_bytes_max"), "{text}");
        assert_eq!(Volume::from_toml(&text).unwrap().page_bytes_max, PAGE_BYTES_MAX_DEFAULT);
        let small = text.replace("page_count = 10", "page_count = 10\npage_bytes_max = 100000");
        assert_eq!(Volume::from_toml(&small).unwrap().page_bytes_max, 100_000);
    }
}
