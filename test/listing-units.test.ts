import assert from 'node:assert/strict';
import { compileFilter } from '../src/rules/glob.js';
import { catalogEntries, catalogLink, catalogWalk, CATALOG_PAGE_MAX, pageTags, parsePageQuery, tagsLink, TAGS_PAGE_MAX } from '../src/proxy/listing.js';

describe('listing: pagination (pure)', () => {
  it('parses n and last, an empty value as absent, and caps n', () => {
    assert.deepEqual(parsePageQuery('', 'catalog'), { ok: true, page: { n: undefined, last: undefined } });
    assert.deepEqual(parsePageQuery('n=&last=', 'catalog'), { ok: true, page: { n: undefined, last: undefined } });
    assert.deepEqual(parsePageQuery('n=1&last=corp%2Fteam%2Fapp', 'catalog'), { ok: true, page: { n: 1, last: 'corp/team/app' } });
    assert.deepEqual(parsePageQuery('n=5000', 'catalog'), { ok: true, page: { n: CATALOG_PAGE_MAX, last: undefined } });
    assert.deepEqual(parsePageQuery('n=99999999999999999999', 'tags'), { ok: true, page: { n: TAGS_PAGE_MAX, last: undefined } });
    assert.deepEqual(parsePageQuery('n=0&last=v1.2_rc-1', 'tags'), { ok: true, page: { n: 0, last: 'v1.2_rc-1' } });
  });

  const refused: Array<[string, 'catalog' | 'tags', string, RegExp]> = [
    ['n=-1', 'catalog', 'PAGINATION_NUMBER_INVALID', /^n must be a non-negative integer, not "-1"$/],
    ['n=abc', 'tags', 'PAGINATION_NUMBER_INVALID', /^n must be a non-negative integer, not "abc"$/],
    ['n=1.5', 'catalog', 'PAGINATION_NUMBER_INVALID', /not "1.5"/],
    ['last=Corp/App', 'catalog', 'NAME_INVALID', /^last must be a repository name as the catalog lists it/],
    [`last=${'a'.repeat(256)}`, 'catalog', 'NAME_INVALID', /at most 255 characters/],
    ['last=a%0Ab', 'catalog', 'NAME_INVALID', /last must be/],
    ['last=a/b', 'tags', 'TAG_INVALID', /^last must be a tag/],
    [`last=${'t'.repeat(129)}`, 'tags', 'TAG_INVALID', /at most 128/],
  ];
  for (const [query, list, code, message] of refused) {
    it(`refuses ${list} ${query.slice(0, 40)} with 400 ${code}`, () => {
      const r = parsePageQuery(query, list);
      assert.equal(r.ok, false);
      if (!r.ok) {
        assert.equal(r.error.status, 400);
        assert.equal(r.error.code, code);
        assert.match(r.error.message, message);
        assert.ok(r.error.message.length < 300, 'one short line, however long the value');
      }
    });
  }

  it('walks rules in the lexical order of <rule>/, each from its part of last', () => {
    const rules = ['a0', 'a', 'a-b', 'corp'].map((name) => ({ name, rule: name }));
    // '-' < '/' < '0': "a-b/…" < "a/…" < "a0/…".
    assert.deepEqual(catalogWalk(rules, undefined).map((s) => [s.name, s.after]), [['a-b', undefined], ['a', undefined], ['a0', undefined], ['corp', undefined]]);
    assert.deepEqual(catalogWalk(rules, 'a/team/app').map((s) => [s.name, s.after]), [['a', 'team/app'], ['a0', undefined], ['corp', undefined]]);
    assert.deepEqual(catalogWalk(rules, 'a0').map((s) => [s.name, s.after]), [['a0', undefined], ['corp', undefined]]);
    assert.deepEqual(catalogWalk(rules, 'b').map((s) => [s.name, s.after]), [['corp', undefined]]);
    assert.deepEqual(catalogWalk(rules, 'zzz'), []);
  });

  it('takes an upstream page sorted, after `after`, leaving out what the proxy would refuse', () => {
    const filter = compileFilter({ include: ['team/**', 'x/*'], exclude: ['team/secret'] });
    const entries = catalogEntries('corp', ['team/b', 'team/a', 'team/secret', 'other', 'team/a', 7, 'Bad/Name', 'x/y', `team/${'n'.repeat(250)}`], 'team/a', filter);
    assert.deepEqual(
      entries.map((e) => [e.upstream, e.listed]),
      [
        ['team/b', 'corp/team/b'],
        [`team/${'n'.repeat(250)}`, undefined],
        ['team/secret', undefined],
        ['x/y', 'corp/x/y'],
      ],
    );
  });

  it('pages a tag list the upstream answered whole, and keeps the upstream own next page', () => {
    const all = ['v2', 'latest', '10', 'v1', 'v1'];
    assert.deepEqual(pageTags(all, { n: 2, last: undefined }, false), { tags: ['10', 'latest'], nextAfter: 'latest' });
    assert.deepEqual(pageTags(all, { n: 2, last: 'latest' }, false), { tags: ['v1', 'v2'], nextAfter: undefined });
    assert.deepEqual(pageTags(all, { n: undefined, last: 'v1' }, false), { tags: ['v2'], nextAfter: undefined });
    assert.deepEqual(pageTags(all, { n: 0, last: undefined }, false), { tags: [], nextAfter: undefined });
    assert.deepEqual(pageTags(['a', 'b'], { n: 2, last: undefined }, true), { tags: ['a', 'b'], nextAfter: 'b' });
    assert.deepEqual(pageTags(null, { n: 2, last: undefined }, false), { tags: [], nextAfter: undefined });
  });

  it('writes Link headers as distribution does', () => {
    assert.equal(catalogLink('corp/team/app', 100), '</v2/_catalog?last=corp%2Fteam%2Fapp&n=100>; rel="next"');
    assert.equal(tagsLink('corp', 'team/app', 'v1', 2), '</v2/corp/team/app/tags/list?last=v1&n=2>; rel="next"');
    assert.equal(tagsLink('corp', 'team/app', 'v1', undefined), '</v2/corp/team/app/tags/list?last=v1>; rel="next"');
  });
});
