//! A network partition of one cluster node, on one machine: nftables drops
//! every packet to the node's cluster (route) port and every route packet
//! the node sends (told apart by its uid, `meta skuid`: start it with
//! [`NatsCluster::restart_as`]). Clients keep reaching it; the node loses
//! its peers, so it loses JetStream quorum while they keep it.

use std::process::Command;

use crate::NatsCluster;

/// An active partition; healed on [`heal`](Self::heal) or drop.
#[derive(Debug)]
pub struct Partition {
    table: String,
}

impl Partition {
    /// Cut `node` (running as `uid`) off from the other nodes. Needs root
    /// and `nft`.
    pub fn cut(cluster: &NatsCluster, node: usize, uid: u32) -> std::io::Result<Partition> {
        let table = format!("tidewatch_partition_{}_{node}", std::process::id());
        let peers: Vec<String> = (0..cluster.node_count())
            .filter(|&n| n != node)
            .map(|n| cluster.cluster_port(n).to_string())
            .collect();
        let rules = format!(
            "table inet {table} {{\n\
               chain output {{\n\
                 type filter hook output priority 0; policy accept;\n\
                 tcp dport {port} drop\n\
                 meta skuid {uid} tcp dport {{ {peers} }} drop\n\
               }}\n\
             }}\n",
            port = cluster.cluster_port(node),
            peers = peers.join(", "),
        );
        nft(&["-f", "-"], Some(&rules))?;
        Ok(Partition { table })
    }

    /// Let the node's routes through again.
    pub fn heal(self) {
        drop(self);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "inet", &self.table], None);
    }
}

fn nft(args: &[&str], stdin: Option<&str>) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
