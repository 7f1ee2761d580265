//! `flashsale lag`: how far the consumer groups are behind, for operators
//! deciding whether to add workers (and for scripts, as JSON).

use flashsale_core::bus::kafka::{KafkaFailure, group, topic};
use flashsale_core::bus::lag::{self, GroupLag};
use flashsale_core::service::settings::KafkaSettings;

/// The project's groups and what each consumes, with the deployment's
/// prefix.
pub fn project_groups(kafka: &KafkaSettings) -> Vec<(String, Vec<String>)> {
    vec![
        (
            kafka.group(group::SHOP),
            vec![
                kafka.topic(topic::PURCHASE_REQUESTS),
                kafka.topic(topic::STOCK_RELEASES),
            ],
        ),
        (
            kafka.group(group::ORDERS),
            vec![kafka.topic(topic::RESERVATIONS)],
        ),
    ]
}

/// The lag of each group in `groups` (default: the project's two), on the
/// topics it is known to consume, `topics`, and (with `members`) whatever
/// its members own.
pub async fn read(
    kafka: &KafkaSettings,
    groups: &[String],
    topics: &[String],
    members: bool,
) -> Result<Vec<GroupLag>, KafkaFailure> {
    let known = project_groups(kafka);
    let wanted: Vec<(String, Vec<String>)> = if groups.is_empty() {
        known
    } else {
        groups
            .iter()
            .map(|g| {
                let mut consumed = known
                    .iter()
                    .find(|(name, _)| name == g)
                    .map(|(_, t)| t.clone())
                    .unwrap_or_default();
                consumed.extend(topics.iter().cloned());
                (g.clone(), consumed)
            })
            .collect()
    };
    let mut out = Vec::new();
    for (group, consumed) in wanted {
        out.push(lag::group_lag(kafka, &group, &consumed, members).await?);
    }
    Ok(out)
}

/// A table a person reads at a glance.
pub fn human(groups: &[GroupLag]) -> String {
    let mut out = String::new();
    for g in groups {
        out.push_str(&format!(
            "group {}  state {}  members {}  lag {} messages{}\n",
            g.group,
            g.state,
            g.members.len(),
            g.total_lag,
            g.max_lag_seconds
                .map(|s| format!(", oldest waiting {s:.1} s"))
                .unwrap_or_default()
        ));
        out.push_str(&row([
            "topic",
            "partition",
            "end",
            "committed",
            "lag",
            "lag s",
            "owner",
        ]));
        for p in &g.partitions {
            out.push_str(&row([
                &p.topic,
                &p.partition.to_string(),
                &p.end_offset.to_string(),
                &p.committed.map_or("-".into(), |c| c.to_string()),
                &p.lag.to_string(),
                &p.lag_seconds.map_or("-".into(), |s| format!("{s:.1}")),
                p.owner.as_deref().unwrap_or("-"),
            ]));
        }
        for m in &g.members {
            out.push_str(&format!(
                "  member {} ({} on {}): {}\n",
                m.id,
                m.client_id,
                m.host,
                if m.partitions.is_empty() {
                    "no partitions".to_owned()
                } else {
                    m.partitions.join(", ")
                }
            ));
        }
    }
    out
}

/// One line of a group's table: the header, or a partition.
fn row(cells: [&str; 7]) -> String {
    let [topic, partition, end, committed, lag, seconds, owner] = cells;
    format!(
        "  {topic:<40} {partition:>9} {end:>10} {committed:>10} {lag:>8} {seconds:>8}  {owner}\n"
    )
}
