// What validate says beyond errors: rules that can never match, and the key meant by a misspelt one.

import assert from 'node:assert/strict';
import { parseConfig } from '../src/rules/config.js';
import { configWarnings, editDistance, suggestKey } from '../src/rules/lint.js';
import { configFrom } from './support/config.js';

const BROKER = 'broker: {keyFiles: [/k]}\n';

describe('config analysis (validate warnings and suggestions)', () => {
  it('warns about a rule shadowed by an earlier rule on the same registry without filters', () => {
    const config = configFrom(`${BROKER}registries:
  - {name: all, match: [r.example], upstream: "http://127.0.0.1:1"}
  - {name: other, match: [other.example], upstream: "http://127.0.0.1:2"}
  - {name: late, match: [R.EXAMPLE], upstream: "http://127.0.0.1:3"}
`);
    const warnings = configWarnings(config);
    assert.equal(warnings.length, 1, JSON.stringify(warnings));
    assert.equal(warnings[0]?.key, 'registries[2]');
    assert.match(warnings[0]?.message ?? '', /rule "late" can never match: registries\[0\] \(all\) comes first/);
  });

  it('does not warn where the earlier rule leaves something to the later one (filters), and names a host taken while others remain', () => {
    const config = configFrom(`${BROKER}registries:
  - {name: apps, match: [r.example], upstream: "http://127.0.0.1:1", repositories: {include: ["apps/**"]}}
  - {name: rest, match: [r.example], upstream: "http://127.0.0.1:2"}
  - {name: two, match: [r.example, s.example], upstream: "http://127.0.0.1:3"}
`);
    const warnings = configWarnings(config);
    assert.deepEqual(
      warnings.map((w) => w.key),
      ['registries[2].match[0]'],
    );
    assert.match(warnings[0]?.message ?? '', /"r\.example" never reaches rule "two": registries\[1\] \(rest\)/);
  });

  it('warns about a rule shadowed by an earlier rule whose filters cover its own: x/** before x/app, ** before anything, no narrower namespaces', () => {
    const config = configFrom(`${BROKER}registries:
  - {name: team, match: [r.example], upstream: "http://127.0.0.1:1", repositories: {include: ["team/**"]}}
  - {name: app, match: [r.example], upstream: "http://127.0.0.1:2", repositories: {include: ["team/app", "team/*/tools"]}}
  - {name: all, match: [s.example], upstream: "http://127.0.0.1:3", repositories: {include: ["**"]}, namespaces: {include: ["*"]}}
  - {name: late, match: [s.example], upstream: "http://127.0.0.1:4", namespaces: {include: ["shop"]}}
  - {name: narrow, match: [t.example], upstream: "http://127.0.0.1:5", repositories: {include: ["apps/*"]}, namespaces: {include: ["shop-*"]}}
  - {name: wider, match: [t.example], upstream: "http://127.0.0.1:6", repositories: {include: ["apps/web"]}, namespaces: {include: ["shop-eu"]}}
`);
    const warnings = configWarnings(config);
    assert.deepEqual(warnings.map((w) => w.key), ['registries[1]', 'registries[3]', 'registries[5]'], JSON.stringify(warnings));
    assert.match(warnings[0]?.message ?? '', /^rule "app" can never match: registries\[0\] \(team\) comes first for the same registry and its repositories and namespaces filters let through every image this rule would take$/);
    assert.match(warnings[1]?.message ?? '', /^rule "late" can never match: registries\[2\] \(all\)/);
  });

  it('no shadowing warning where the earlier filter is narrower: other repositories, a namespace filter the later rule lacks, an exclude the later rule lacks', () => {
    const config = configFrom(`${BROKER}registries:
  - {name: team, match: [r.example], upstream: "http://127.0.0.1:1", repositories: {include: ["team/**"]}, namespaces: {include: ["shop"]}}
  - {name: app, match: [r.example], upstream: "http://127.0.0.1:2", repositories: {include: ["team/app"]}}
  - {name: web, match: [s.example], upstream: "http://127.0.0.1:3", repositories: {include: ["web/*"]}}
  - {name: deep, match: [s.example], upstream: "http://127.0.0.1:4", repositories: {include: ["web/a/b", "web/**"]}}
  - {name: most, match: [t.example], upstream: "http://127.0.0.1:5", repositories: {include: ["**"], exclude: ["legacy/**"]}}
  - {name: legacy, match: [t.example], upstream: "http://127.0.0.1:6", repositories: {include: ["legacy/app"]}}
`);
    assert.deepEqual(configWarnings(config), []);
  });

  it('warns about a registry host listed twice in one rule', () => {
    const config = configFrom(`${BROKER}registries:
  - {name: corp, match: [r.example, s.example, R.example], upstream: "http://127.0.0.1:1"}
`);
    const warnings = configWarnings(config);
    assert.deepEqual(warnings.map((w) => [w.key, w.message]), [['registries[0].match[2]', '"R.example" is listed twice in rule "corp" (also match[0])']]);
  });

  it('warns that a config without rules rewrites nothing', () => {
    assert.deepEqual(configWarnings(configFrom(`${BROKER}registries: []\n`)).map((w) => w.key), ['registries']);
  });

  it('warns about globs no repository or namespace can match', () => {
    const config = configFrom(`${BROKER}registries:
  - name: a
    match: [r.example]
    upstream: "http://127.0.0.1:1"
    repositories: {include: ["Team/*", "apps/**", "/lead", "x:y"], exclude: ["**"]}
    namespaces: {include: ["team-*", "Team_*"]}
`);
    const keys = configWarnings(config).map((w) => w.key);
    assert.deepEqual(keys, [
      'registries[0].repositories.include[0]',
      'registries[0].repositories.include[2]',
      'registries[0].repositories.include[3]',
      'registries[0].namespaces.include[1]',
      'registries[0].repositories.exclude[0]',
    ]);
  });

  it('a valid everyday config has no warnings', () => {
    const config = configFrom(`${BROKER}registries:
  - {name: corp, match: [registry.corp.example:5000], upstream: "http://127.0.0.1:1", repositories: {exclude: ["legacy/**"]}}
  - {name: legacy, match: [registry.corp.example:5000], upstream: "http://127.0.0.1:2"}
  - {name: hub, match: [docker.io], upstream: "http://127.0.0.1:3", repositories: {include: ["library/*", "bitnami/**"]}}
`);
    assert.deepEqual(configWarnings(config), []);
  });

  it('suggests the known key for a misspelt or foreign one, at the right level', () => {
    const result = parseConfig(`regsitries: []\nproxy: {prot: 1}\nregistries:\n  - {name: a, match: [r.example], url: "http://127.0.0.1:1", auth: {mdoe: anonymous}}\n`);
    assert.equal(result.ok, false);
    const unknown = result.ok ? [] : result.errors.filter((e) => e.message === 'unknown key').map((e) => `${e.key} -> ${String(suggestKey(e.key))}`);
    assert.deepEqual(unknown.sort(), ['proxy.prot -> port', 'registries[0].auth.mdoe -> mode', 'registries[0].url -> upstream', 'regsitries -> registries'].sort());
    assert.equal(suggestKey('registries[0].zzzzzzzz'), null, 'nothing close: no suggestion');
    assert.equal(suggestKey('nosuch.deeper.key'), null);
  });

  it('edit distance counts a swap of neighbours as one edit', () => {
    assert.equal(editDistance('regsitries', 'registries'), 1);
    assert.equal(editDistance('', 'abc'), 3);
    assert.equal(editDistance('kitten', 'sitting'), 3);
  });
});
