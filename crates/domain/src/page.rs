//! Paging of lists: `page` from 1, `size` 1..=100.

use crate::error::InvalidValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    page: u64,
    size: u64,
}

impl PageRequest {
    pub const DEFAULT_SIZE: i64 = 20;
    pub const MAX_SIZE: u64 = 100;

    /// # Errors
    /// [`InvalidValue`] for a page below 1, a page so far out its offset overflows, or a size outside `1..=100`.
    pub fn new(page: i64, size: i64) -> Result<Self, InvalidValue> {
        let page =
            u64::try_from(page).ok().filter(|p| *p >= 1).ok_or(InvalidValue::new("page", "must be at least 1"))?;
        let size = u64::try_from(size)
            .ok()
            .filter(|s| (1..=Self::MAX_SIZE).contains(s))
            .ok_or(InvalidValue::new("size", "must be between 1 and 100"))?;
        // Offsets travel as i64 in SQL.
        if (page - 1).checked_mul(size).is_none_or(|offset| i64::try_from(offset).is_err()) {
            return Err(InvalidValue::new("page", "is too large"));
        }
        Ok(Self { page, size })
    }

    #[must_use]
    pub const fn page(self) -> u64 {
        self.page
    }

    #[must_use]
    pub const fn size(self) -> u64 {
        self.size
    }

    #[must_use]
    pub const fn offset(self) -> u64 {
        (self.page - 1) * self.size
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self { page: 1, size: 20 }
    }
}

/// One page of a list and the size of the whole list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page: u64,
    pub size: u64,
    pub total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bounds() {
        assert_eq!(PageRequest::new(3, 20).unwrap().offset(), 40);
        assert_eq!(PageRequest::new(0, 20).unwrap_err().field, "page");
        assert_eq!(PageRequest::new(1, 0).unwrap_err().field, "size");
        assert_eq!(PageRequest::new(1, 101).unwrap_err().field, "size");
        assert_eq!(PageRequest::new(i64::MAX, 100).unwrap_err().field, "page");
    }
}
