//! [`UnitOfWork`] and [`Transaction`] on a SeaORM database transaction.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Condition, Expr, ExprTrait, OnConflict};
use sea_orm::sea_query::{LockBehavior, LockType};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait, Set, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait,
};
use shop_domain::DomainError;
use shop_domain::auth::Pending;
use shop_domain::cart::CartItem;
use shop_domain::events::NewEvent;
use shop_domain::idempotency::{IdempotencyClaim, StoredResponse};
use shop_domain::ids::{OrderId, PaymentId, ProductOptionId, UserId};
use shop_domain::money::{Money, Quantity, Stock};
use shop_domain::order::{NewOrder, Order, OrderItem, OrderStatus};
use shop_domain::payment::{Payment, PaymentMethod, PaymentStatus};
use shop_domain::ports::{
    CartTx, FencedWrite, IdempotencyTx, OrderTx, OutboxTx, PaymentTx, StockRow, StockTx, Transaction, UnitOfWork,
};
use shop_domain::product::ProductOption;
use shop_domain::sales::DailySales;
use shop_domain::user::{ChargeAmount, User};

use crate::carts::cart_lines;
use crate::entity::{cart, daily_popular_product as daily, order, order_item, payment, product, product_option, user};
use crate::error::{Stored, db};
use crate::products::to_option;
use crate::users::to_user;

#[derive(Debug, Clone)]
pub struct SeaUnitOfWork {
    db: DatabaseConnection,
}

impl SeaUnitOfWork {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl UnitOfWork for SeaUnitOfWork {
    async fn begin(&self) -> Result<Box<dyn Transaction>, DomainError> {
        // IMMEDIATE takes SQLite's write lock at BEGIN: a read-then-write transaction can then never fail with
        // "database is locked" on its first write; others wait out the busy timeout instead. PostgreSQL ignores it.
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        let tx = self.db.begin_with_options(options).await.map_err(db)?;
        Ok(Box::new(SeaTransaction { tx, deferred: Vec::new() }))
    }
}

/// One open database transaction; dropped without [`Transaction::commit`], it rolls back.
///
/// On PostgreSQL the writes that nothing in the transaction reads back (a batch's cart clean-up and its events)
/// are deferred: they travel as data-modifying CTEs in front of the next stock write, which an order batch makes
/// last, under the hot row's lock. So that lock is held for two round trips fewer. Any other statement, and the
/// commit, sends what is deferred first, so every statement still sees the transaction's earlier writes.
#[derive(Debug)]
pub struct SeaTransaction {
    tx: DatabaseTransaction,
    /// PostgreSQL statements not sent yet, in the order they were made.
    deferred: Vec<Statement>,
}

impl SeaTransaction {
    /// Whether writes may wait for the next statement (PostgreSQL's data-modifying CTEs).
    fn defers(&self) -> bool {
        self.tx.get_database_backend() == DbBackend::Postgres
    }

    /// Sends what is deferred, as one statement.
    async fn flush(&mut self) -> Result<(), DomainError> {
        let Some(last) = self.deferred.pop() else { return Ok(()) };
        let statement = fused(std::mem::take(&mut self.deferred), last);
        self.tx.execute_raw(statement).await.map_err(db)?;
        Ok(())
    }

    /// Runs `update` with what is deferred in front of it; the rows it (alone) changed.
    async fn update<E: EntityTrait>(&mut self, update: sea_orm::UpdateMany<E>) -> Result<u64, DomainError> {
        if self.deferred.is_empty() {
            return Ok(update.exec(&self.tx).await.map_err(db)?.rows_affected);
        }
        let statement = fused(std::mem::take(&mut self.deferred), update.build(DbBackend::Postgres));
        Ok(self.tx.execute_raw(statement).await.map_err(db)?.rows_affected())
    }
}

/// `WITH d0 AS (first), d1 AS (second) main`: one PostgreSQL statement that runs every one of `before` and then
/// `main` on one snapshot, each placeholder renumbered to its place in the joined values. The command's row count
/// is `main`'s. `before` must write other tables than `main` (a row changed twice in one statement is an error).
fn fused(before: Vec<Statement>, main: Statement) -> Statement {
    if before.is_empty() {
        return main;
    }
    let mut sql = String::from("WITH ");
    let mut values: Vec<sea_orm::Value> = Vec::new();
    for (i, statement) in before.into_iter().enumerate() {
        sql.push_str(&format!("d{i} AS ({}), ", renumbered(&statement.sql, values.len())));
        values.extend(statement.values.map(|v| v.0).unwrap_or_default());
    }
    let tail = renumbered(&main.sql, values.len());
    match tail.strip_prefix("WITH ") {
        Some(its_own) => sql.push_str(its_own),
        None => {
            sql.truncate(sql.len() - 2);
            sql.push(' ');
            sql.push_str(&tail);
        }
    }
    values.extend(main.values.map(|v| v.0).unwrap_or_default());
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// `sql` with every PostgreSQL placeholder `$n` made `$(n + offset)` (our statements hold no `$` otherwise).
fn renumbered(sql: &str, offset: usize) -> String {
    if offset == 0 {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 16);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        match digits.parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&digits),
        }
    }
    out
}

#[async_trait]
impl CartTx for SeaTransaction {
    async fn user_exists(&mut self, id: UserId) -> Result<bool, DomainError> {
        self.flush().await?;
        let found = user::Entity::find_by_id(id.get())
            .filter(user::Column::DeletedAt.is_null())
            .select_only()
            .column(user::Column::Id)
            .count(&self.tx)
            .await
            .map_err(db)?;
        Ok(found > 0)
    }

    async fn find_option(&mut self, id: ProductOptionId) -> Result<Option<ProductOption>, DomainError> {
        self.flush().await?;
        product_option::Entity::find_by_id(id.get())
            .filter(product_option::Column::DeletedAt.is_null())
            .inner_join(product::Entity)
            .filter(product::Column::DeletedAt.is_null())
            .one(&self.tx)
            .await
            .map_err(db)?
            .map(to_option)
            .transpose()
    }

    async fn cart_quantity(
        &mut self,
        user_id: UserId,
        option_id: ProductOptionId,
    ) -> Result<Option<Quantity>, DomainError> {
        self.flush().await?;
        let quantity: Option<i64> = cart::Entity::find()
            .select_only()
            .column(cart::Column::Quantity)
            .filter(cart::Column::UserId.eq(user_id.get()))
            .filter(cart::Column::ProductOptionId.eq(option_id.get()))
            .filter(cart::Column::DeletedAt.is_null())
            .into_tuple()
            .one(&self.tx)
            .await
            .map_err(db)?;
        quantity.map(|q| Quantity::new(q).stored()).transpose()
    }

    async fn add_to_cart(
        &mut self,
        user_id: UserId,
        option_id: ProductOptionId,
        quantity: Quantity,
        now: DateTime<Utc>,
    ) -> Result<Option<CartItem>, DomainError> {
        self.flush().await?;
        let added = quantity.get();
        let current = Expr::col((cart::Entity, cart::Column::Quantity));
        // One upsert on the live line (`uq_carts_user_option`): concurrent adds of one option merge instead of
        // racing to insert two lines, and the WHERE keeps the merged line within the limit.
        let inserted = cart::Entity::insert(cart::ActiveModel {
            user_id: Set(user_id.get()),
            product_option_id: Set(option_id.get()),
            quantity: Set(added),
            created_at: Set(now),
            updated_at: Set(now),
            deleted_at: Set(None),
            ..Default::default()
        })
        .on_conflict(
            OnConflict::columns([cart::Column::UserId, cart::Column::ProductOptionId])
                .target_and_where(Expr::col(cart::Column::DeletedAt).is_null())
                .value(cart::Column::Quantity, current.clone().add(added))
                .value(cart::Column::UpdatedAt, now)
                .action_and_where(current.add(added).lte(Quantity::MAX))
                .to_owned(),
        )
        .exec_without_returning(&self.tx)
        .await
        .map_err(db)?;
        if inserted == 0 {
            return Ok(None);
        }
        let line = cart_lines(&self.tx, user_id, Some(option_id)).await?.into_iter().next();
        line.map(Some).ok_or_else(|| DomainError::unexpected("the cart line just written is not there"))
    }

    async fn remove_from_carts(
        &mut self,
        carts: &[(UserId, Vec<ProductOptionId>)],
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        if carts.is_empty() {
            return Ok(());
        }
        let mut whose = Condition::any();
        for (user_id, options) in carts {
            whose = whose.add(
                Condition::all()
                    .add(cart::Column::UserId.eq(user_id.get()))
                    .add(cart::Column::ProductOptionId.is_in(options.iter().map(|o| o.get()))),
            );
        }
        let update = cart::Entity::update_many()
            .col_expr(cart::Column::DeletedAt, Expr::value(Some(now)))
            .col_expr(cart::Column::UpdatedAt, Expr::value(now))
            .filter(cart::Column::DeletedAt.is_null())
            .filter(whose);
        if self.defers() {
            // Nothing reads these lines again before the commit: they go with the next stock write.
            self.deferred.push(update.build(DbBackend::Postgres));
            return Ok(());
        }
        update.exec(&self.tx).await.map_err(db)?;
        Ok(())
    }
}

#[async_trait]
impl OrderTx for SeaTransaction {
    async fn hold_users(&mut self, ids: &[UserId]) -> Result<Vec<(UserId, Pending)>, DomainError> {
        self.flush().await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<i64> = ids.iter().map(|id| id.get()).collect();
        if self.tx.get_database_backend() == DbBackend::Postgres {
            // Ascending, so two batches lock shared users in one order. SQLite needs no lock: its IMMEDIATE
            // transactions already write one at a time.
            let _: Vec<i64> = user::Entity::find()
                .select_only()
                .column(user::Column::Id)
                .filter(user::Column::Id.is_in(raw.iter().copied()))
                .order_by_asc(user::Column::Id)
                .lock(LockType::NoKeyUpdate)
                .into_tuple()
                .all(&self.tx)
                .await
                .map_err(db)?;
        }
        // `idx_orders_pending_user` finds each user's unpaid orders.
        let held: Vec<(i64, i64, i64)> = order::Entity::find()
            .select_only()
            .column(order::Column::UserId)
            .column_as(Expr::col((order::Entity, order::Column::Id)).count_distinct(), "orders")
            // PostgreSQL sums BIGINTs into NUMERIC: cast back, on both stores.
            .column_as(Expr::cust("CAST(COALESCE(SUM(order_items.quantity), 0) AS BIGINT)"), "units")
            .inner_join(order_item::Entity)
            .filter(order::Column::UserId.is_in(raw))
            .filter(order::Column::Status.eq(OrderStatus::PendingPayment.as_str()))
            .group_by(order::Column::UserId)
            .into_tuple()
            .all(&self.tx)
            .await
            .map_err(db)?;
        held.into_iter()
            .map(|(user, orders, units)| {
                let orders = u32::try_from(orders).map_err(DomainError::unexpected)?;
                Ok((UserId::new(user).stored()?, Pending { orders, units }))
            })
            .collect()
    }

    async fn insert_orders(&mut self, orders: &[NewOrder]) -> Result<Vec<Order>, DomainError> {
        self.flush().await?;
        let (order_ids, payment_ids) = if self.tx.get_database_backend() == DbBackend::Postgres {
            self.insert_orders_at_once(orders).await?
        } else {
            self.insert_orders_in_rows(orders).await?
        };
        orders
            .iter()
            .zip(order_ids.iter().zip(&payment_ids))
            .map(|(new, (order_id, payment_id))| {
                let order_id = OrderId::new(*order_id).stored()?;
                Ok(Order {
                    id: order_id,
                    user_id: new.user_id,
                    status: OrderStatus::PendingPayment,
                    total_price: new.total_price,
                    ordered_at: new.ordered_at,
                    items: new.items.clone(),
                    payment: Payment {
                        id: PaymentId::new(*payment_id).stored()?,
                        order_id,
                        user_id: new.user_id,
                        status: PaymentStatus::Pending,
                        method: PaymentMethod::Balance,
                        amount: new.total_price,
                        paid_at: None,
                    },
                })
            })
            .collect()
    }

    async fn delete_orders(&mut self, ids: &[OrderId]) -> Result<(), DomainError> {
        self.flush().await?;
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = ids.iter().map(|id| id.get()).collect();
        order_item::Entity::delete_many()
            .filter(order_item::Column::OrderId.is_in(ids.iter().copied()))
            .exec(&self.tx)
            .await
            .map_err(db)?;
        payment::Entity::delete_many()
            .filter(payment::Column::OrderId.is_in(ids.iter().copied()))
            .exec(&self.tx)
            .await
            .map_err(db)?;
        order::Entity::delete_many().filter(order::Column::Id.is_in(ids)).exec(&self.tx).await.map_err(db)?;
        Ok(())
    }

    async fn find_orders(&mut self, ids: &[OrderId]) -> Result<Vec<Order>, DomainError> {
        self.flush().await?;
        let rows = order::Entity::find()
            .filter(order::Column::Id.is_in(ids.iter().map(|id| id.get())))
            .filter(order::Column::DeletedAt.is_null())
            .order_by_asc(order::Column::Id)
            .all(&self.tx)
            .await
            .map_err(db)?;
        crate::orders::load_orders(&self.tx, rows).await
    }

    async fn transition_orders(
        &mut self,
        ids: &[OrderId],
        from: OrderStatus,
        to: OrderStatus,
        now: DateTime<Utc>,
    ) -> Result<Vec<OrderId>, DomainError> {
        self.flush().await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let moved = order::Entity::update_many()
            .col_expr(order::Column::Status, Expr::value(to.as_str()))
            .col_expr(order::Column::UpdatedAt, Expr::value(now))
            .filter(order::Column::Id.is_in(ids.iter().map(|id| id.get())))
            .filter(order::Column::Status.eq(from.as_str()))
            .exec_with_returning(&self.tx)
            .await
            .map_err(db)?;
        moved.into_iter().map(|o| OrderId::new(o.id).stored()).collect()
    }

    async fn overdue_orders(&mut self, placed_before: DateTime<Utc>, limit: u64) -> Result<Vec<OrderId>, DomainError> {
        self.flush().await?;
        // `idx_orders_status_ordered_at` finds them; SKIP LOCKED lets concurrent sweepers take disjoint rows.
        let mut query = order::Entity::find()
            .select_only()
            .column(order::Column::Id)
            .filter(order::Column::Status.eq(OrderStatus::PendingPayment.as_str()))
            .filter(order::Column::OrderedAt.lt(placed_before))
            .order_by_asc(order::Column::OrderedAt)
            .order_by_asc(order::Column::Id)
            .limit(limit);
        if self.tx.get_database_backend() == DbBackend::Postgres {
            query = query.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let ids: Vec<i64> = query.into_tuple().all(&self.tx).await.map_err(db)?;
        ids.into_iter().map(|id| OrderId::new(id).stored()).collect()
    }
}

#[async_trait]
impl PaymentTx for SeaTransaction {
    async fn users(&mut self, ids: &[UserId]) -> Result<Vec<User>, DomainError> {
        self.flush().await?;
        let rows = user::Entity::find()
            .filter(user::Column::Id.is_in(ids.iter().map(|id| id.get())))
            .filter(user::Column::DeletedAt.is_null())
            .order_by_asc(user::Column::Id)
            .all(&self.tx)
            .await
            .map_err(db)?;
        rows.into_iter().map(to_user).collect()
    }

    async fn spend_balances(
        &mut self,
        spends: &[(UserId, Money)],
        now: DateTime<Utc>,
    ) -> Result<Vec<UserId>, DomainError> {
        self.flush().await?;
        if spends.is_empty() {
            return Ok(Vec::new());
        }
        // One UPDATE for every user: `balance - CASE id WHEN .. THEN amount .. END`, guarded by the same CASE
        // so that a user whose balance is short is left out (and unchanged).
        let mut amount = sea_orm::sea_query::CaseStatement::new();
        for (user, money) in spends {
            amount = amount.case(Expr::col(user::Column::Id).eq(user.get()), Expr::val(money.won()));
        }
        let amount: sea_orm::sea_query::SimpleExpr = amount.into();
        let spent = user::Entity::update_many()
            .col_expr(user::Column::Balance, Expr::col(user::Column::Balance).sub(amount.clone()))
            .col_expr(user::Column::Version, Expr::col(user::Column::Version).add(1))
            .col_expr(user::Column::UpdatedAt, Expr::value(now))
            .filter(user::Column::Id.is_in(spends.iter().map(|(u, _)| u.get())))
            .filter(user::Column::DeletedAt.is_null())
            .filter(Expr::col(user::Column::Balance).gte(amount))
            .exec_with_returning(&self.tx)
            .await
            .map_err(db)?;
        spent.into_iter().map(|u| UserId::new(u.id).stored()).collect()
    }

    async fn charge_balance(
        &mut self,
        id: UserId,
        amount: ChargeAmount,
        limit: Money,
        now: DateTime<Utc>,
    ) -> Result<Money, DomainError> {
        self.flush().await?;
        crate::users::charge_on(&self.tx, id, amount, limit, now).await
    }

    async fn settle_payments(
        &mut self,
        ids: &[PaymentId],
        status: PaymentStatus,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        self.flush().await?;
        if ids.is_empty() {
            return Ok(());
        }
        let paid_at = (status == PaymentStatus::Completed).then_some(now);
        payment::Entity::update_many()
            .col_expr(payment::Column::Status, Expr::value(status.as_str()))
            .col_expr(payment::Column::PaidAt, Expr::value(paid_at))
            .col_expr(payment::Column::UpdatedAt, Expr::value(now))
            .filter(payment::Column::Id.is_in(ids.iter().map(|id| id.get())))
            .exec(&self.tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn add_daily_sales(&mut self, sales: &[DailySales], now: DateTime<Utc>) -> Result<(), DomainError> {
        self.flush().await?;
        for sale in sales {
            // One upsert per (day, option): the first sale of a day inserts the row, the rest add to it, and
            // two first sales at once cannot both insert (the reference's duplicate-key failure).
            let current = Expr::col((daily::Entity, daily::Column::TotalSold));
            daily::Entity::insert(daily::ActiveModel {
                product_id: Set(sale.product_id.get()),
                product_option_id: Set(sale.option_id.get()),
                sold_date: Set(sale.day),
                total_sold: Set(sale.units),
                updated_at: Set(now),
                ..Default::default()
            })
            .on_conflict(
                OnConflict::columns([daily::Column::SoldDate, daily::Column::ProductOptionId])
                    .value(daily::Column::TotalSold, current.add(sale.units))
                    .value(daily::Column::UpdatedAt, now)
                    .to_owned(),
            )
            .exec_without_returning(&self.tx)
            .await
            .map_err(db)?;
        }
        Ok(())
    }
}

#[async_trait]
impl StockTx for SeaTransaction {
    async fn read_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError> {
        self.flush().await?;
        self.stock_rows(ids, false).await
    }

    async fn lock_stock(&mut self, ids: &[ProductOptionId]) -> Result<Vec<StockRow>, DomainError> {
        self.flush().await?;
        self.stock_rows(ids, true).await
    }

    async fn write_stock(
        &mut self,
        id: ProductOptionId,
        stock: Stock,
        expected_version: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError> {
        let mut update = product_option::Entity::update_many()
            .col_expr(product_option::Column::Stock, Expr::value(stock.get()))
            .col_expr(product_option::Column::Version, Expr::col(product_option::Column::Version).add(1))
            .col_expr(product_option::Column::UpdatedAt, Expr::value(now))
            .filter(product_option::Column::Id.eq(id.get()));
        if let Some(version) = expected_version {
            update = update.filter(product_option::Column::Version.eq(version));
        }
        Ok(self.update(update).await? == 1)
    }

    async fn decrement_stock(
        &mut self,
        id: ProductOptionId,
        units: i64,
        fence: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<FencedWrite, DomainError> {
        let Some(fence) = fence else {
            let written = self.update(conditional_decrement(id, units, now)).await?;
            return Ok(if written == 1 { FencedWrite::Written } else { FencedWrite::OutOfStock });
        };
        let fence = i64::try_from(fence).map_err(DomainError::unexpected)?;
        // Equal tokens pass: one lock hold may write its option more than once.
        let fenced = conditional_decrement(id, units, now)
            .col_expr(product_option::Column::FenceToken, Expr::value(fence))
            .filter(product_option::Column::FenceToken.lte(fence));
        if self.update(fenced).await? == 1 {
            return Ok(FencedWrite::Written);
        }
        // Which condition refused it: the fence is the one that matters for safety, so it is checked first.
        let newest: Option<i64> = product_option::Entity::find_by_id(id.get())
            .select_only()
            .column(product_option::Column::FenceToken)
            .into_tuple()
            .one(&self.tx)
            .await
            .map_err(db)?;
        Ok(match newest {
            Some(newest) if newest > fence => FencedWrite::Fenced { newest: u64::try_from(newest).unwrap_or(0) },
            _ => FencedWrite::OutOfStock,
        })
    }

    async fn restore_stock(
        &mut self,
        units: &BTreeMap<ProductOptionId, i64>,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        self.flush().await?;
        for (option, n) in units {
            // Clamped at what a read accepts: an admin count near the bound plus units coming back must not make
            // the row unreadable (or fail the cancellation on the CHECK constraint).
            let back = Expr::col(product_option::Column::Stock).add(*n);
            let clamped = Expr::case(back.clone().gt(Stock::MAX), Expr::value(Stock::MAX)).finally(back);
            product_option::Entity::update_many()
                .col_expr(product_option::Column::Stock, clamped.into())
                .col_expr(product_option::Column::Version, Expr::col(product_option::Column::Version).add(1))
                .col_expr(product_option::Column::UpdatedAt, Expr::value(now))
                .filter(product_option::Column::Id.eq(option.get()))
                .exec(&self.tx)
                .await
                .map_err(db)?;
        }
        Ok(())
    }
}

#[async_trait]
impl IdempotencyTx for SeaTransaction {
    async fn record_response(
        &mut self,
        claim: &IdempotencyClaim,
        response: &StoredResponse,
        now: DateTime<Utc>,
    ) -> Result<bool, DomainError> {
        self.flush().await?;
        crate::idempotency::record_response(&self.tx, claim, response, now).await
    }
}

#[async_trait]
impl OutboxTx for SeaTransaction {
    async fn record_events(&mut self, events: &[NewEvent], now: DateTime<Utc>) -> Result<(), DomainError> {
        if self.defers() {
            // Nothing reads the events back before the commit: they go with the next stock write.
            if let Some(insert) = crate::outbox::postgres_insert(events, now)? {
                self.deferred.push(insert);
            }
            return Ok(());
        }
        crate::outbox::record(&self.tx, events, now).await
    }
}

#[async_trait]
impl Transaction for SeaTransaction {
    async fn commit(mut self: Box<Self>) -> Result<(), DomainError> {
        self.flush().await?;
        self.tx.commit().await.map_err(db)
    }
}

/// `UPDATE product_options SET stock = stock - n, version = version + 1 WHERE id = ? AND stock >= n`: the
/// decrement every strategy but the pessimistic one writes with. The version moves so that an optimistic
/// writer that read the old stock retries.
fn conditional_decrement(
    id: ProductOptionId,
    n: i64,
    now: DateTime<Utc>,
) -> sea_orm::UpdateMany<product_option::Entity> {
    product_option::Entity::update_many()
        .col_expr(product_option::Column::Stock, Expr::col(product_option::Column::Stock).sub(n))
        .col_expr(product_option::Column::Version, Expr::col(product_option::Column::Version).add(1))
        .col_expr(product_option::Column::UpdatedAt, Expr::value(now))
        .filter(product_option::Column::Id.eq(id.get()))
        .filter(product_option::Column::Stock.gte(n))
}

/// Orders, items and payments in one statement on PostgreSQL, whatever the batch's size: the rows travel as
/// arrays (`unnest`), the ids come from the identity sequences in the same statement, and the foreign keys are
/// checked at its end, when all three tables hold their rows. One round trip instead of five (two id draws,
/// three multi-row INSERTs whose VALUES lists grow with the batch).
const INSERT_ORDERS: &str = "\
WITH t AS MATERIALIZED (
    SELECT u.n, u.user_id, u.total, u.at,
           nextval(pg_get_serial_sequence('orders', 'id')) AS order_id,
           nextval(pg_get_serial_sequence('payments', 'id')) AS payment_id
    FROM unnest($1::int8[], $2::int8[], $3::timestamptz[]) WITH ORDINALITY AS u(user_id, total, at, n)
), o AS (
    INSERT INTO orders (id, user_id, total_price, status, ordered_at, updated_at)
    SELECT order_id, user_id, total, $4, at, at FROM t
), i AS (
    INSERT INTO order_items (order_id, product_id, product_option_id, product_name, option_name, quantity,
                             unit_price, total_price_at_order, created_at)
    SELECT t.order_id, x.product_id, x.option_id, x.product_name, x.option_name, x.quantity, x.unit_price,
           x.total, t.at
    FROM unnest($5::int8[], $6::int8[], $7::int8[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::int8[])
         AS x(n, product_id, option_id, product_name, option_name, quantity, unit_price, total)
    JOIN t ON t.n = x.n
), p AS (
    INSERT INTO payments (id, order_id, user_id, amount, method, status, created_at, updated_at)
    SELECT payment_id, order_id, user_id, total, $13, $14, at, at FROM t
)
SELECT order_id, payment_id FROM t ORDER BY n";

impl SeaTransaction {
    /// PostgreSQL: [`INSERT_ORDERS`]; each order's id and its payment's, in the orders' order.
    async fn insert_orders_at_once(&self, orders: &[NewOrder]) -> Result<(Vec<i64>, Vec<i64>), DomainError> {
        // Each item carries its order's position (from 1, as `WITH ORDINALITY` counts).
        let items = || (1_i64..).zip(orders).flat_map(|(n, o)| o.items.iter().map(move |i| (n, i)));
        let values: Vec<sea_orm::Value> = vec![
            orders.iter().map(|o| o.user_id.get()).collect::<Vec<i64>>().into(),
            orders.iter().map(|o| o.total_price.won()).collect::<Vec<i64>>().into(),
            orders.iter().map(|o| o.ordered_at).collect::<Vec<DateTime<Utc>>>().into(),
            OrderStatus::PendingPayment.as_str().into(),
            items().map(|(n, _)| n).collect::<Vec<i64>>().into(),
            items().map(|(_, i)| i.product_id.get()).collect::<Vec<i64>>().into(),
            items().map(|(_, i)| i.product_option_id.get()).collect::<Vec<i64>>().into(),
            items().map(|(_, i)| i.product_name.clone()).collect::<Vec<String>>().into(),
            items().map(|(_, i)| i.option_name.clone()).collect::<Vec<String>>().into(),
            items().map(|(_, i)| i.quantity.get()).collect::<Vec<i64>>().into(),
            items().map(|(_, i)| i.unit_price.won()).collect::<Vec<i64>>().into(),
            items().map(|(_, i)| i.total_price.won()).collect::<Vec<i64>>().into(),
            PaymentMethod::Balance.as_str().into(),
            PaymentStatus::Pending.as_str().into(),
        ];
        let rows = self
            .tx
            .query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, INSERT_ORDERS, values))
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| Ok((r.try_get_by_index::<i64>(0).map_err(db)?, r.try_get_by_index::<i64>(1).map_err(db)?)))
            .collect::<Result<Vec<(i64, i64)>, DomainError>>()
            .map(|ids| ids.into_iter().unzip())
    }

    /// SQLite: ids above the largest, then one multi-row INSERT per table ([`insert_chunked`]).
    async fn insert_orders_in_rows(&self, orders: &[NewOrder]) -> Result<(Vec<i64>, Vec<i64>), DomainError> {
        let order_ids = self.next_ids("orders", orders.len()).await?;
        let payment_ids = self.next_ids("payments", orders.len()).await?;
        let rows: Vec<order::ActiveModel> = orders
            .iter()
            .zip(&order_ids)
            .map(|(new, id)| order::ActiveModel {
                id: Set(*id),
                user_id: Set(new.user_id.get()),
                total_price: Set(new.total_price.won()),
                status: Set(OrderStatus::PendingPayment.as_str().to_owned()),
                ordered_at: Set(new.ordered_at),
                updated_at: Set(new.ordered_at),
                deleted_at: Set(None),
            })
            .collect();
        let items: Vec<order_item::ActiveModel> = orders
            .iter()
            .zip(&order_ids)
            .flat_map(|(new, id)| new.items.iter().map(move |i| item_row(*id, i, new.ordered_at)))
            .collect();
        let payments: Vec<payment::ActiveModel> = orders
            .iter()
            .zip(order_ids.iter().zip(&payment_ids))
            .map(|(new, (order_id, id))| payment::ActiveModel { id: Set(*id), ..pending_payment(*order_id, new) })
            .collect();
        insert_chunked::<order::Entity, _>(&self.tx, rows).await?;
        insert_chunked::<order_item::Entity, _>(&self.tx, items).await?;
        insert_chunked::<payment::Entity, _>(&self.tx, payments).await?;
        Ok((order_ids, payment_ids))
    }

    /// `n` fresh ids for `table` on SQLite, to insert a batch with one multi-row statement and still know each
    /// row's id: above the largest id, which is safe because the IMMEDIATE transaction holds the one write lock
    /// until it commits, so nobody else can take them meanwhile.
    async fn next_ids(&self, table: &str, n: usize) -> Result<Vec<i64>, DomainError> {
        let count = i64::try_from(n).map_err(DomainError::unexpected)?;
        let backend = self.tx.get_database_backend();
        let sql = format!("SELECT COALESCE(MAX(id), 0) FROM {table}");
        let top = self
            .tx
            .query_one_raw(Statement::from_string(backend, sql))
            .await
            .map_err(db)?
            .map(|r| r.try_get_by_index::<i64>(0))
            .transpose()
            .map_err(db)?
            .unwrap_or(0);
        Ok((1..=count).map(|k| top + k).collect())
    }

    /// Stock rows ascending by id; `lock` takes `FOR NO KEY UPDATE` row locks on PostgreSQL (SQLite has none
    /// and needs none: its IMMEDIATE transactions already run one writer at a time).
    async fn stock_rows(&self, ids: &[ProductOptionId], lock: bool) -> Result<Vec<StockRow>, DomainError> {
        let mut query = product_option::Entity::find()
            .select_only()
            .column(product_option::Column::Id)
            .column(product_option::Column::Stock)
            .column(product_option::Column::Version)
            .filter(product_option::Column::Id.is_in(ids.iter().map(|id| id.get())))
            .order_by_asc(product_option::Column::Id);
        if lock && self.tx.get_database_backend() == DbBackend::Postgres {
            query = query.lock(LockType::NoKeyUpdate);
        }
        let rows: Vec<(i64, i64, i64)> = query.into_tuple().all(&self.tx).await.map_err(db)?;
        rows.into_iter()
            .map(|(id, stock, version)| {
                Ok(StockRow {
                    option_id: ProductOptionId::new(id).stored()?,
                    stock: Stock::new(stock).stored()?,
                    version,
                })
            })
            .collect()
    }
}

/// The row of one order item.
fn item_row(order_id: i64, i: &OrderItem, now: DateTime<Utc>) -> order_item::ActiveModel {
    order_item::ActiveModel {
        order_id: Set(order_id),
        product_id: Set(i.product_id.get()),
        product_option_id: Set(i.product_option_id.get()),
        product_name: Set(i.product_name.clone()),
        option_name: Set(i.option_name.clone()),
        quantity: Set(i.quantity.get()),
        unit_price: Set(i.unit_price.won()),
        total_price_at_order: Set(i.total_price.won()),
        created_at: Set(now),
        deleted_at: Set(None),
        ..Default::default()
    }
}

/// The PENDING payment of a new order (its id is set by the caller).
fn pending_payment(order_id: i64, new: &NewOrder) -> payment::ActiveModel {
    payment::ActiveModel {
        order_id: Set(order_id),
        user_id: Set(new.user_id.get()),
        amount: Set(new.total_price.won()),
        method: Set(PaymentMethod::Balance.as_str().to_owned()),
        status: Set(PaymentStatus::Pending.as_str().to_owned()),
        paid_at: Set(None),
        created_at: Set(new.ordered_at),
        updated_at: Set(new.ordered_at),
        deleted_at: Set(None),
        ..Default::default()
    }
}

/// Rows per multi-row INSERT: far below SQLite's 32,766 and PostgreSQL's 65,535 bound parameters at the
/// widest row (ten columns).
const ROWS_PER_INSERT: usize = 1_000;

/// Inserts `rows` in one multi-row INSERT per [`ROWS_PER_INSERT`].
pub(crate) async fn insert_chunked<E, A>(tx: &DatabaseTransaction, rows: Vec<A>) -> Result<(), DomainError>
where
    E: EntityTrait,
    A: sea_orm::ActiveModelTrait<Entity = E> + Send,
{
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<A> = rows.by_ref().take(ROWS_PER_INSERT).collect();
        E::insert_many(chunk).exec_without_returning(tx).await.map_err(db)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(sql: &str, values: Vec<sea_orm::Value>) -> Statement {
        Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
    }

    #[test]
    fn deferred_writes_go_in_front_of_the_main_statement_with_their_placeholders_renumbered() {
        let carts = statement("UPDATE carts SET deleted_at = $1 WHERE user_id = $2", vec![7.into(), 8.into()]);
        let events = statement("INSERT INTO outbox_events (kind) SELECT $1", vec!["x".into()]);
        let main = statement("UPDATE product_options SET stock = stock - $1 WHERE id = $2", vec![1.into(), 2.into()]);
        let joined = fused(vec![carts, events], main);
        assert_eq!(
            joined.sql,
            "WITH d0 AS (UPDATE carts SET deleted_at = $1 WHERE user_id = $2), \
             d1 AS (INSERT INTO outbox_events (kind) SELECT $3) \
             UPDATE product_options SET stock = stock - $4 WHERE id = $5"
        );
        let values = joined.values.unwrap().0;
        assert_eq!(values, vec![7.into(), 8.into(), "x".into(), 1.into(), 2.into()]);
    }

    #[test]
    fn a_main_statement_with_its_own_ctes_keeps_them_after_the_deferred_ones() {
        let before = statement("DELETE FROM carts WHERE id = $1", vec![1.into()]);
        let main =
            statement("WITH t AS (SELECT $1::int8 AS n) UPDATE product_options SET stock = t.n FROM t", vec![5.into()]);
        let joined = fused(vec![before], main);
        assert_eq!(
            joined.sql,
            "WITH d0 AS (DELETE FROM carts WHERE id = $1), t AS (SELECT $2::int8 AS n) \
             UPDATE product_options SET stock = t.n FROM t"
        );
        assert_eq!(fused(Vec::new(), statement("SELECT $1", vec![1.into()])).sql, "SELECT $1");
        assert_eq!(renumbered("$1, $10, $2", 9), "$10, $19, $11");
    }
}
