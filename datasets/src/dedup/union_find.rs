//! Disjoint sets with path halving and union by size.

#[derive(Debug, Clone)]
pub struct UnionFind {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl UnionFind {
    pub fn new(n: usize) -> Self {
        Self {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        }
    }

    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] as usize != x {
            let p = self.parent[x] as usize;
            self.parent[x] = self.parent[p];
            x = self.parent[x] as usize;
        }
        x
    }

    /// Joins the sets of `a` and `b`; true if they were apart.
    pub fn union(&mut self, a: usize, b: usize) -> bool {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        if self.size[ra] < self.size[rb] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb] = ra as u32;
        self.size[ra] += self.size[rb];
        true
    }

    /// Sets with more than one member, each sorted ascending, ordered by their smallest member.
    pub fn groups(&mut self) -> Vec<Vec<usize>> {
        let n = self.parent.len();
        let mut by_root: std::collections::HashMap<usize, Vec<usize>> = Default::default();
        for i in 0..n {
            let r = self.find(i);
            by_root.entry(r).or_default().push(i);
        }
        let mut out: Vec<Vec<usize>> = by_root.into_values().filter(|g| g.len() > 1).collect();
        out.sort_by_key(|g| g[0]);
        out
    }
}

/// Items equal to an earlier one: returns the indices of first occurrences and, for every
/// later copy, the pair (first occurrence, copy). Searching only the first occurrences keeps
/// buckets full of copies from costing a quadratic number of comparisons.
pub fn collapse_identical<K: std::hash::Hash + Eq>(
    keys: &[K],
) -> (Vec<usize>, Vec<(usize, usize)>) {
    let mut first: std::collections::HashMap<&K, usize> = Default::default();
    let mut reps = Vec::new();
    let mut copies = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match first.get(k) {
            Some(&f) => copies.push((f, i)),
            None => {
                first.insert(k, i);
                reps.push(i);
            }
        }
    }
    (reps, copies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_transitively() {
        let mut uf = UnionFind::new(6);
        assert!(uf.union(0, 3));
        assert!(uf.union(3, 5));
        assert!(!uf.union(5, 0));
        uf.union(1, 2);
        assert_eq!(uf.groups(), vec![vec![0, 3, 5], vec![1, 2]]);
        assert_eq!(uf.find(4), 4);
    }

    #[test]
    fn copies_point_at_their_first_occurrence() {
        let (reps, copies) = collapse_identical(&["a", "b", "a", "c", "b", "a"]);
        assert_eq!(reps, vec![0, 1, 3]);
        assert_eq!(copies, vec![(0, 2), (1, 4), (0, 5)]);
    }
}
