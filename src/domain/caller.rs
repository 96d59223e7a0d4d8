//! Who is calling. The API edge turns a bearer token into a [`Caller`]; every read and write
//! below it takes one, and nothing else decides who may see what.
use uuid::Uuid;

/// What a caller may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `service_role`: every job.
    Service,
    /// `authenticated`: only the jobs this user owns.
    User(Uuid),
}

/// An authenticated caller: a role, and when its token stops being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    role: Role,
    /// Unix seconds after which the token (plus leeway) is no longer valid.
    expires_at: i64,
}

impl Caller {
    /// A caller whose token (leeway included) is valid until `expires_at` (Unix seconds).
    pub fn new(role: Role, expires_at: i64) -> Self {
        Caller { role, expires_at }
    }

    /// The service itself, for background work such as sweeping (never from a request).
    pub fn internal_service() -> Self {
        Caller::new(Role::Service, i64::MAX)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The user this caller is scoped to, or `None` for the service role.
    pub fn user(&self) -> Option<Uuid> {
        match self.role {
            Role::Service => None,
            Role::User(u) => Some(u),
        }
    }

    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// How long from now the caller's token stays valid (at most a year: a token without a
    /// practical expiry never ends a call).
    pub fn valid_for(&self) -> std::time::Duration {
        let now = chrono::Utc::now().timestamp();
        let secs = self
            .expires_at
            .saturating_sub(now)
            .clamp(0, 365 * 24 * 3600);
        std::time::Duration::from_secs(secs as u64)
    }

    pub fn role_name(&self) -> &'static str {
        match self.role {
            Role::Service => "service_role",
            Role::User(_) => "authenticated",
        }
    }
}
