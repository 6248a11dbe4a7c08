//! File-descriptor limit: every connection is one descriptor, and the default soft limit
//! (often 1024) is far below what a gateway or a load generator holds. Raise the soft limit
//! to the hard one at start-up, and say clearly when even that is not enough.

/// Descriptors kept free for files, listeners, Redis connections and the like.
const HEADROOM_FDS: u64 = 64;

/// The hard limit is below what the process needs.
#[derive(Debug, thiserror::Error)]
#[error(
    "{connections} connections need about {needed} file descriptors, but the hard limit \
     (RLIMIT_NOFILE) is {hard}: raise it (`ulimit -Hn`, needs CAP_SYS_RESOURCE or root outside \
     a container) or use fewer connections per process"
)]
pub struct FdLimitError {
    pub connections: u64,
    pub needed: u64,
    pub hard: u64,
}

/// Make room for `connections` descriptors; returns the soft limit now in force.
pub fn ensure(connections: usize) -> Result<u64, FdLimitError> {
    let needed = connections as u64 + HEADROOM_FDS;
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    if soft >= needed {
        return Ok(soft);
    }
    let err = |hard| FdLimitError {
        connections: connections as u64,
        needed,
        hard,
    };
    if hard < needed {
        return Err(err(hard));
    }
    rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).map_err(|_| err(soft))?;
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_beyond_the_hard_limit_is_refused_with_the_numbers() {
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
        let too_many = usize::try_from(hard).unwrap_or(usize::MAX - 1000) + 1;
        let e = ensure(too_many).err();
        assert!(e.as_ref().is_some_and(|e| e.hard == hard), "{e:?}");
        assert!(ensure(10).is_ok_and(|soft| soft >= 10 + HEADROOM_FDS));
    }
}
