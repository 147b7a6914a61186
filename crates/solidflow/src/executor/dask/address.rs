//! Reading Dask addresses: whether a scheduler is on this machine.

/// Whether a scheduler address (`tcp://127.0.0.1:8786`, `localhost:8786`) is on this machine.
pub(super) fn is_loopback_address(address: &str) -> bool {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(is_loopback_address("tcp://127.0.0.1:8786"));
        assert!(is_loopback_address("localhost:8786"));
        assert!(is_loopback_address("tcp://[::1]:8786"));
        assert!(!is_loopback_address("tls://scheduler.example:8786"));
    }
}
