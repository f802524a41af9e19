//! Templates: the reusable part of a database's creation parameters, exported as JSON a
//! create accepts again, and checked like any change set before reuse.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::spec::{Engine, Flavour};
use super::units::{duration_text, mysql_size_text, pg_size_text};
use super::validate::{validate, ParamErrors, ParamProblem, ProblemKind, Validated};
use super::Value;

/// The version of the [`Template`] format this agent writes and reads.
pub const TEMPLATE_FORMAT: u32 = 1;

/// The reusable part of a database's creation parameters (DSM's "reuse creation
/// parameters"): the flavour and the tuned parameters, without the instance name.
///
/// A template never contains secrets: it holds only parameters on the allow-list, which
/// are tuning knobs; passwords, user names, certificates and storage keys are not
/// parameters, and [`Template::validate`] refuses any name not on the allow-list, so
/// none can ride along.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Template {
    /// [`TEMPLATE_FORMAT`].
    pub format: u32,
    pub flavour: Flavour,
    /// As a control plane would send them to [`validate`]; sizes and durations with
    /// units (`"256MB"`, `"5min"`) so people can read them.
    pub parameters: BTreeMap<String, Json>,
}

impl Template {
    /// A template of validated values (say, [`Validated::values`] of a database's
    /// creation, or its overrides read back from the include file).
    pub fn from_values(flavour: Flavour, values: &BTreeMap<String, Value>) -> Self {
        let parameters = values
            .iter()
            .map(|(name, value)| (name.clone(), template_json(flavour.engine(), value)))
            .collect();
        Template {
            format: TEMPLATE_FORMAT,
            flavour,
            parameters,
        }
    }

    /// Checks the template for its own flavour.
    pub fn validate(&self) -> Result<Validated, ParamErrors> {
        self.validate_for(self.flavour)
    }

    /// Checks the template for a database of `flavour` (a MySQL 8 template reused for
    /// MariaDB, say): every parameter the target lacks is reported.
    pub fn validate_for(&self, flavour: Flavour) -> Result<Validated, ParamErrors> {
        let mut problems = Vec::new();
        if self.format != TEMPLATE_FORMAT {
            problems.push(ParamProblem::new(
                "format",
                ProblemKind::UnsupportedFormat { found: self.format },
            ));
        }
        if self.flavour.engine() != flavour.engine() {
            problems.push(ParamProblem::new(
                "flavour",
                ProblemKind::Conflict {
                    reason: format!(
                        "the template is for {}, the database is {flavour}",
                        self.flavour
                    ),
                },
            ));
        }
        let changes: serde_json::Map<String, Json> = self
            .parameters
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        match validate(flavour, &changes) {
            Ok(validated) if problems.is_empty() => Ok(validated),
            Ok(_) => Err(ParamErrors(problems)),
            Err(ParamErrors(more)) => {
                problems.extend(more);
                Err(ParamErrors(problems))
            }
        }
    }
}

fn template_json(engine: Engine, value: &Value) -> Json {
    match value {
        Value::Int(n) => Json::from(*n),
        Value::Bytes(0) | Value::DurationMs(0) => Json::from(0),
        Value::Bytes(b) => match engine {
            Engine::Postgres => Json::String(pg_size_text(*b)),
            Engine::Mysql => mysql_size_text(*b).map_or_else(|| Json::from(*b), Json::String),
        },
        Value::DurationMs(ms) => Json::String(duration_text(*ms)),
        Value::Bool(b) => Json::Bool(*b),
        Value::Text(s) => Json::String(s.clone()),
        Value::Real(x) => serde_json::Number::from_f64(*x).map_or(Json::Null, Json::Number),
        Value::Disabled => Json::from(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::params::test_support::{mysql_sample, ok, postgres_sample};
    use serde_json::json;

    #[test]
    fn templates_round_trip_through_json() {
        for sample in [postgres_sample(), mysql_sample()] {
            let template = Template::from_values(sample.flavour, &sample.values);
            let text = serde_json::to_string(&template).unwrap();
            let back: Template = serde_json::from_str(&text).unwrap();
            assert_eq!(back, template);
            assert_eq!(back.validate().unwrap().values, sample.values, "{text}");
        }
        let template = Template::from_values(
            Flavour::Postgres,
            &ok(
                Flavour::Postgres,
                json!({"shared_buffers": "256MB", "checkpoint_timeout": 600}),
            )
            .values,
        );
        assert_eq!(
            serde_json::to_value(&template).unwrap(),
            json!({
                "format": 1,
                "flavour": "postgres",
                "parameters": {"checkpoint_timeout": "10min", "shared_buffers": "256MB"}
            })
        );
        let template = Template::from_values(Flavour::Mysql8, &mysql_sample().values);
        assert_eq!(template.parameters["innodb_buffer_pool_size"], json!("2G"));
        assert_eq!(template.parameters["tmp_table_size"], json!(16_777_217));
        assert_eq!(template.parameters["long_query_time"], json!("500ms"));
    }

    #[test]
    fn template_problems() {
        let mut template = Template::from_values(Flavour::Mysql8, &mysql_sample().values);
        let errors = template.validate_for(Flavour::Mariadb).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "innodb_redo_log_capacity: not available on MariaDB (only on MySQL 8)"
        );
        template.format = 2;
        template
            .parameters
            .insert("password".into(), json!("hunter2"));
        let errors = template.validate().unwrap_err().to_string();
        let lines: Vec<&str> = errors.lines().collect();
        assert_eq!(lines.len(), 2, "{errors}");
        assert_eq!(
            lines[0],
            "format: template format 2 is not supported (this agent reads format 1)"
        );
        assert_eq!(
            lines[1],
            "password: unknown parameter (not on the MySQL 8 allow-list)"
        );
        assert!(!errors.contains("hunter2"));
        let template = Template::from_values(Flavour::Postgres, &postgres_sample().values);
        let errors = template.validate_for(Flavour::Mysql8).unwrap_err();
        assert_eq!(
            errors.0[0].to_string(),
            "flavour: the template is for PostgreSQL, the database is MySQL 8"
        );
        let template: Template = serde_json::from_value(json!({
            "format": 1, "flavour": "mariadb", "parameters": {"expire_logs_days": 3}
        }))
        .unwrap();
        assert_eq!(
            template.validate().unwrap().values["expire_logs_days"],
            Value::Int(3)
        );
    }
}
