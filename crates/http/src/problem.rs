//! RFC 9457 problem responses, and the one place where an error becomes an HTTP status and a stable `code`.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use shop_domain::{DomainError, InvalidValue};
use utoipa::ToSchema;

/// The problem document every error answers with (`application/problem+json`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[schema(example = "https://shop.example.com/problems/out-of-stock")]
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    #[schema(example = "Out of stock")]
    pub title: String,
    #[schema(example = 409)]
    pub status: u16,
    /// What went wrong with this request.
    #[schema(example = "product option 7 does not have the stock asked for")]
    pub detail: String,
    /// A stable identifier that clients branch on.
    #[schema(example = "OUT_OF_STOCK")]
    pub code: &'static str,
    /// The request field at fault, for `VALIDATION_FAILED`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The option at fault, for `OUT_OF_STOCK`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_option_id: Option<i64>,
    /// Each dependency asked and its answer (`UP` or `DOWN`), for `NOT_READY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, String>>, example = json!({"database": "UP", "redis": "DOWN"}))]
    pub checks: Option<BTreeMap<&'static str, &'static str>>,
}

/// Everything a handler can fail with: the domain's errors plus the few that only HTTP knows.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A body, path or query that does not parse or breaks a rule; names the field.
    #[error("{detail}")]
    Validation { field: String, detail: String },
    /// No valid credentials: a missing, malformed, expired or badly signed bearer token (or admin token).
    #[error("missing, malformed, expired or badly signed bearer token")]
    Unauthorized,
    /// Authenticated, but acting for someone else (a path or body user that is not the caller).
    #[error("this route acts for the signed-in user only")]
    Forbidden,
    #[error("the admin API is disabled: no admin token is configured")]
    AdminDisabled,
    #[error("no route matches this method and path")]
    RouteNotFound,
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A dependency did not answer the readiness probe in time.
    #[error("not ready: {detail}")]
    NotReady { detail: String, checks: BTreeMap<&'static str, &'static str> },
}

impl From<InvalidValue> for ApiError {
    fn from(value: InvalidValue) -> Self {
        Self::Validation { field: value.field.to_owned(), detail: value.to_string() }
    }
}

impl From<validator::ValidationErrors> for ApiError {
    fn from(errors: validator::ValidationErrors) -> Self {
        let (field, detail) = first_violation(&errors, "");
        Self::Validation { field, detail }
    }
}

/// The first violated rule, with its field as a path (`items[0].quantity`).
fn first_violation(errors: &validator::ValidationErrors, prefix: &str) -> (String, String) {
    use validator::ValidationErrorsKind as Kind;
    let mut fields: Vec<_> = errors.errors().iter().collect();
    fields.sort_by_key(|(name, _)| name.to_string());
    for (name, kind) in fields {
        let name = camel_case(name);
        let path = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
        match kind {
            Kind::Field(list) => {
                if let Some(e) = list.first() {
                    return (path.clone(), format!("{path}: {}", describe(e)));
                }
            }
            Kind::Struct(inner) => return first_violation(inner, &path),
            Kind::List(items) => {
                if let Some((index, inner)) = items.iter().next() {
                    return first_violation(inner, &format!("{path}[{index}]"));
                }
            }
        }
    }
    ("body".to_owned(), "body: invalid".to_owned())
}

/// validator names Rust fields; clients know the JSON (camelCase) names.
fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// "must be between 1 and 1000" rather than validator's bare rule code.
fn describe(e: &validator::ValidationError) -> String {
    if let Some(message) = &e.message {
        return message.to_string();
    }
    let param = |k: &str| e.params.get(k).map(ToString::to_string);
    let bounds = match (param("min"), param("max")) {
        (Some(min), Some(max)) => format!("between {min} and {max}"),
        (Some(min), None) => format!("at least {min}"),
        (None, Some(max)) => format!("at most {max}"),
        (None, None) => String::new(),
    };
    match e.code.as_ref() {
        "range" => format!("must be {bounds}"),
        "length" => format!("length must be {bounds}"),
        code => format!("breaks the rule `{code}`"),
    }
}

struct Entry {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
}

const fn entry(status: StatusCode, code: &'static str, title: &'static str) -> Entry {
    Entry { status, code, title }
}

/// The table of statuses and codes for domain errors. No `_` arm: a new variant must be given its answer here.
fn domain_entry(error: &DomainError) -> Entry {
    use DomainError as D;
    match error {
        D::Invalid(_) => entry(StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "Validation failed"),
        D::UserNotFound(_) => entry(StatusCode::NOT_FOUND, "USER_NOT_FOUND", "User not found"),
        D::ProductNotFound(_) => entry(StatusCode::NOT_FOUND, "PRODUCT_NOT_FOUND", "Product not found"),
        D::ProductOptionNotFound(_) => {
            entry(StatusCode::NOT_FOUND, "PRODUCT_OPTION_NOT_FOUND", "Product option not found")
        }
        D::CartItemNotFound(_) => entry(StatusCode::NOT_FOUND, "CART_ITEM_NOT_FOUND", "Cart item not found"),
        D::OrderNotFound(_) => entry(StatusCode::NOT_FOUND, "ORDER_NOT_FOUND", "Order not found"),
        D::BalanceLimitExceeded { .. } => {
            entry(StatusCode::UNPROCESSABLE_ENTITY, "BALANCE_LIMIT_EXCEEDED", "Balance limit exceeded")
        }
        D::CartQuantityLimitExceeded { .. } => {
            entry(StatusCode::UNPROCESSABLE_ENTITY, "CART_QUANTITY_LIMIT_EXCEEDED", "Cart line quantity limit exceeded")
        }
        D::InsufficientBalance { .. } => {
            entry(StatusCode::PAYMENT_REQUIRED, "INSUFFICIENT_BALANCE", "Insufficient balance")
        }
        D::OutOfStock { .. } => entry(StatusCode::CONFLICT, "OUT_OF_STOCK", "Out of stock"),
        D::ProductNotOnSale { .. } => entry(StatusCode::CONFLICT, "PRODUCT_NOT_ON_SALE", "Product not on sale"),
        D::OrderNotPayable { .. } => entry(StatusCode::CONFLICT, "ORDER_NOT_PAYABLE", "Order not payable"),
        // A conflict that outlived its retries, or a lock that expired under its holder, is to the client
        // a lock it could not get in time: nothing was kept, and a retry may succeed.
        D::LockTimeout { .. } | D::WriteConflict | D::StaleLock { .. } => {
            entry(StatusCode::SERVICE_UNAVAILABLE, "LOCK_TIMEOUT", "Lock wait timed out")
        }
        D::UserNameTaken(_) => entry(StatusCode::CONFLICT, "USER_NAME_TAKEN", "User name taken"),
        D::InvalidCredentials => entry(StatusCode::UNAUTHORIZED, "INVALID_CREDENTIALS", "Invalid credentials"),
        D::InvalidToken => entry(StatusCode::UNAUTHORIZED, "INVALID_TOKEN", "Invalid token"),
        D::TooManyAttempts { .. } => entry(StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_ATTEMPTS", "Too many attempts"),
        D::PendingLimitExceeded { .. } => {
            entry(StatusCode::CONFLICT, "PENDING_LIMIT_EXCEEDED", "Pending order limit exceeded")
        }
        D::IdempotencyKeyReused => {
            entry(StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED", "Idempotency key reused")
        }
        D::IdempotencyKeyInUse => entry(StatusCode::CONFLICT, "IDEMPOTENCY_KEY_IN_USE", "Idempotency key in use"),
        D::EventNotFound(_) => entry(StatusCode::NOT_FOUND, "EVENT_NOT_FOUND", "Event not found"),
        D::EventNotFailed(_) => entry(StatusCode::CONFLICT, "EVENT_NOT_FAILED", "Event not failed"),
        D::Unavailable { .. } => entry(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE", "Service unavailable"),
        D::Unexpected(_) => entry(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "Internal server error"),
    }
}

/// The URI naming a kind of problem: `OUT_OF_STOCK` -> `https://shop.example.com/problems/out-of-stock`.
fn problem_type(code: &str) -> String {
    format!("https://shop.example.com/problems/{}", code.to_lowercase().replace('_', "-"))
}

/// The problem document of a domain error, as a client sees it (and as an idempotent replay stores it).
#[must_use]
pub fn domain_problem(error: &DomainError) -> Problem {
    let Entry { status, code, title } = domain_entry(error);
    let detail = match error {
        DomainError::Unexpected(_) => "the server failed to handle this request".to_owned(),
        DomainError::Unavailable { .. } => {
            "the service cannot take this request now; nothing was done, retry after Retry-After seconds".to_owned()
        }
        other => other.to_string(),
    };
    let field = match error {
        DomainError::Invalid(v) => Some(v.field.to_owned()),
        _ => None,
    };
    let product_option_id = match error {
        DomainError::OutOfStock { option_id } => Some(option_id.get()),
        _ => None,
    };
    Problem {
        kind: problem_type(code),
        title: title.to_owned(),
        status: status.as_u16(),
        detail,
        code,
        field,
        product_option_id,
        checks: None,
    }
}

impl ApiError {
    /// The table of statuses and codes. No `_` arm: a new variant must be given its answer here.
    fn entry(&self) -> Entry {
        match self {
            Self::Domain(error) => domain_entry(error),
            Self::Validation { .. } => entry(StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "Validation failed"),
            Self::Unauthorized => entry(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "Unauthorized"),
            Self::Forbidden => entry(StatusCode::FORBIDDEN, "FORBIDDEN", "Forbidden"),
            Self::AdminDisabled => entry(StatusCode::FORBIDDEN, "ADMIN_DISABLED", "Admin API disabled"),
            Self::RouteNotFound => entry(StatusCode::NOT_FOUND, "NOT_FOUND", "Not found"),
            Self::PayloadTooLarge { .. } => {
                entry(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "Payload too large")
            }
            Self::NotReady { .. } => entry(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY", "Not ready"),
        }
    }

    /// The problem document, without anything internal in it.
    #[must_use]
    pub fn problem(&self) -> Problem {
        if let Self::Domain(error) = self {
            return domain_problem(error);
        }
        let Entry { status, code, title } = self.entry();
        Problem {
            kind: problem_type(code),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            code,
            field: match self {
                Self::Validation { field, .. } => Some(field.clone()),
                _ => None,
            },
            product_option_id: None,
            checks: match self {
                Self::NotReady { checks, .. } => Some(checks.clone()),
                _ => None,
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.entry().status
    }

    fn error_response(&self) -> HttpResponse {
        let problem = self.problem();
        if let Self::Domain(DomainError::Unexpected(cause)) = self {
            // The client learns nothing internal; the log gets the whole chain.
            let mut chain = cause.to_string();
            let mut source = cause.source();
            while let Some(s) = source {
                chain.push_str(": ");
                chain.push_str(&s.to_string());
                source = s.source();
            }
            tracing::error!(error = %chain, "request failed unexpectedly");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json")));
        if let Self::Domain(DomainError::Unavailable { cause, .. }) = self {
            // Load shed or a dependency down: worth an operator's eye, not a bug's alarm.
            tracing::warn!(cause = %cause, "answered 503");
        }
        if let Self::Domain(
            DomainError::LockTimeout { retry_after_secs }
            | DomainError::Unavailable { retry_after_secs, .. }
            | DomainError::TooManyAttempts { retry_after_secs },
        ) = self
        {
            response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
        }
        if let Self::Domain(DomainError::WriteConflict | DomainError::StaleLock { .. }) = self {
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        // Every 401 names the scheme that would succeed (RFC 9110).
        if self.status_code() == StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(problem)
    }
}

/// One problem of every code the service answers, as a client would see it: the examples of the OpenAPI
/// document (each documented error response shows the problems of the codes its description names).
#[must_use]
pub fn examples() -> Vec<Problem> {
    use shop_domain::ids::{CartItemId, OrderId, ProductId, ProductOptionId, UserId};
    use shop_domain::money::Money;
    use shop_domain::order::OrderStatus;
    let (user, option) = (UserId::new(7).ok(), ProductOptionId::new(4).ok());
    let mut errors: Vec<ApiError> = vec![
        ApiError::Validation {
            field: "items[0].quantity".into(),
            detail: "items[0].quantity: must be between 1 and 1000".into(),
        },
        ApiError::Unauthorized,
        ApiError::Forbidden,
        ApiError::AdminDisabled,
        ApiError::RouteNotFound,
        ApiError::PayloadTooLarge { limit: crate::extract::MAX_BODY_BYTES },
        ApiError::NotReady {
            detail: "redis did not answer".into(),
            checks: BTreeMap::from([("database", "UP"), ("redis", "DOWN")]),
        },
    ];
    let domain = [
        user.map(DomainError::UserNotFound),
        ProductId::new(3).ok().map(DomainError::ProductNotFound),
        option.map(DomainError::ProductOptionNotFound),
        CartItemId::new(12).ok().map(DomainError::CartItemNotFound),
        OrderId::new(31).ok().map(DomainError::OrderNotFound),
        Some(DomainError::BalanceLimitExceeded { limit: Money::MAX_BALANCE }),
        Some(DomainError::CartQuantityLimitExceeded { max: 1000 }),
        Money::new(500)
            .ok()
            .zip(Money::new(38_000).ok())
            .map(|(balance, required)| DomainError::InsufficientBalance { balance, required }),
        option.map(|option_id| DomainError::OutOfStock { option_id }),
        ProductId::new(3).ok().map(|product_id| DomainError::ProductNotOnSale { product_id }),
        OrderId::new(31).ok().map(|order_id| DomainError::OrderNotPayable { order_id, status: OrderStatus::Paid }),
        Some(DomainError::LockTimeout { retry_after_secs: 1 }),
        Some(DomainError::unavailable("example")),
        Some(DomainError::UserNameTaken("kim".into())),
        Some(DomainError::InvalidCredentials),
        Some(DomainError::InvalidToken),
        Some(DomainError::TooManyAttempts { retry_after_secs: 30 }),
        user.map(|user_id| DomainError::PendingLimitExceeded { user_id }),
        Some(DomainError::IdempotencyKeyReused),
        Some(DomainError::IdempotencyKeyInUse),
        Some(DomainError::EventNotFound("0f8e2a8c-8d0e-4c5b-9a57-3f1d2b6c7e90".into())),
        Some(DomainError::EventNotFailed("0f8e2a8c-8d0e-4c5b-9a57-3f1d2b6c7e90".into())),
        Some(DomainError::unexpected("example")),
    ];
    errors.extend(domain.into_iter().flatten().map(ApiError::Domain));
    errors.iter().map(ApiError::problem).collect()
}

/// Gives every `application/problem+json` response of `doc` the examples of the codes its description names
/// (`404 USER_NOT_FOUND or PRODUCT_OPTION_NOT_FOUND` shows both), so that each documented error shows its own
/// status and code rather than one shared example.
pub fn document_examples(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::example::ExampleBuilder;
    let problems = examples();
    for item in doc.paths.paths.values_mut() {
        let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch];
        for operation in operations.into_iter().flatten() {
            for (status, response) in &mut operation.responses.responses {
                let RefOr::T(response) = response else { continue };
                let Some(RefOr::T(content)) = response.content.get_mut("application/problem+json") else { continue };
                for problem in problems
                    .iter()
                    .filter(|p| p.status.to_string() == *status && mentions(&response.description, p.code))
                {
                    let example =
                        ExampleBuilder::new().summary(problem.code).value(serde_json::to_value(problem).ok()).build();
                    content.examples.insert(problem.code.to_owned(), RefOr::T(example));
                }
            }
        }
    }
}

/// Whether `text` names `code` as a word (`ORDER_NOT_FOUND` is not named by `NOT_FOUND`'s description).
fn mentions(text: &str, code: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_uppercase() || c == '_')).any(|word| word == code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_domain::ids::ProductOptionId;

    #[test]
    fn out_of_stock_names_the_option() {
        let e = ApiError::from(DomainError::OutOfStock { option_id: ProductOptionId::new(7).unwrap() });
        let p = e.problem();
        assert_eq!((p.status, p.code, p.product_option_id), (409, "OUT_OF_STOCK", Some(7)));
        assert_eq!(p.kind, "https://shop.example.com/problems/out-of-stock");
    }

    #[test]
    fn validator_errors_name_the_json_field_and_the_rule() {
        use validator::Validate;
        #[derive(Validate, serde::Serialize)]
        struct Line {
            #[validate(range(min = 1, max = 1000))]
            quantity_ordered: i64,
        }
        #[derive(Validate)]
        struct Body {
            #[validate(nested)]
            order_lines: Vec<Line>,
        }
        let body = Body { order_lines: vec![Line { quantity_ordered: 1 }, Line { quantity_ordered: 0 }] };
        let ApiError::Validation { field, detail } = ApiError::from(body.validate().unwrap_err()) else {
            panic!("a validation error")
        };
        assert_eq!(field, "orderLines[1].quantityOrdered");
        assert_eq!(detail, "orderLines[1].quantityOrdered: must be between 1 and 1000");
    }

    #[test]
    fn unexpected_errors_hide_their_cause() {
        let e = ApiError::from(DomainError::unexpected("password=hunter2 in connection string"));
        let p = e.problem();
        assert_eq!((p.status, p.code), (500, "INTERNAL_ERROR"));
        assert!(!p.detail.contains("hunter2"));
    }

    #[test]
    fn unavailable_is_503_with_retry_after_and_hides_its_cause() {
        let e = ApiError::from(DomainError::unavailable("pool timed out on db-3:5432"));
        let r = e.error_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let p = e.problem();
        assert_eq!(p.code, "SERVICE_UNAVAILABLE");
        assert!(!p.detail.contains("db-3"));
    }

    #[test]
    fn lock_timeout_sets_retry_after() {
        let e = ApiError::from(DomainError::LockTimeout { retry_after_secs: 2 });
        let r = e.error_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "2");
        assert_eq!(r.headers().get(header::CONTENT_TYPE).unwrap(), "application/problem+json");
    }
}
