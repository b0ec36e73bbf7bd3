//! Address ranges, `address/prefix`, IPv4 or IPv6: the cluster's Service
//! ranges (`--service-cidr`) and the nodes' pod ranges (`spec.podCIDRs`).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

/// Strict: host bits set are refused, as a flag the operator writes should
/// say what it means.
impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let cidr = Self::parse_loose(s)?;
        if cidr.network() != cidr.address {
            return Err(format!(
                "{s:?} has host bits set (the range is {}/{})",
                cidr.network(),
                cidr.prefix
            ));
        }
        Ok(cidr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl Cidr {
    /// `address/prefix` as written, host bits and all (they are masked off
    /// when matching): the API server accepts a podCIDR written so.
    pub fn parse_loose(s: &str) -> Result<Self, String> {
        let (address, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix)"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} in {s:?} is not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{prefix:?} in {s:?} is not a prefix length (0-{max})"))?;
        Ok(Self { address, prefix })
    }

    /// The address with every host bit cleared.
    pub fn network(&self) -> IpAddr {
        masked(self.address, self.prefix)
    }

    /// Whether `ip`, of the same family, lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.address.is_ipv4() && masked(ip, self.prefix) == self.network()
    }
}

/// `ip` with all but its first `prefix` bits cleared.
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    let prefix = u32::from(prefix);
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            IpAddr::from(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::from(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parsing_refuses_what_loose_parsing_masks() {
        let v4: Cidr = "10.96.0.0/12".parse().unwrap();
        assert_eq!(v4.to_string(), "10.96.0.0/12");
        for bad in [
            "10.96.0.1/12",
            "10.96.0.0",
            "10.96.0.0/33",
            "x/8",
            "fd00::/129",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
        let loose = Cidr::parse_loose("10.96.0.1/12").unwrap();
        assert!(loose.contains("10.111.255.255".parse().unwrap()));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "fd00::/129"] {
            assert!(Cidr::parse_loose(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_hold_what_they_should() {
        let c = Cidr::parse_loose("10.244.1.0/24").unwrap();
        assert!(c.contains("10.244.1.255".parse().unwrap()));
        assert!(!c.contains("10.244.2.0".parse().unwrap()));
        assert!(!c.contains("::ffff:10.244.1.1".parse().unwrap()));
        let v6 = Cidr::parse_loose("fd00:244::/64").unwrap();
        assert!(v6.contains("fd00:244::1:2".parse().unwrap()));
        assert!(!v6.contains("fd00:245::1".parse().unwrap()));
        let all = Cidr::parse_loose("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }
}
