"""Read-only operator views of the store: Admin.Explain and Admin.Mrc."""
