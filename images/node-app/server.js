// A small Express app: its state (a request counter, the process's start time) lives in memory,
// so a VM restored from a snapshot answers with the same pid and started_at and a counter that goes on.
"use strict";
const express = require("express");

const app = express();
const startedAt = new Date().toISOString();
let requests = 0;

app.get("/", (req, res) => {
  requests += 1;
  res.json({ app: "node-app", node: process.version, express: require("express/package.json").version,
             pid: process.pid, started_at: startedAt, requests });
});

app.listen(8080, "0.0.0.0", () => console.log("node-app listening on :8080"));
