"""Training drafters on the target's own outputs: `fastdecode train data`, `fastdecode train draft`."""
